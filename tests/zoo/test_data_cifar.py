"""CIFAR-10 batches, ImageNet-style folders and batched augmentation, on small generated files."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from structsparse.zoo import data


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Default cache in a temp dir, no env overrides, a small validation split."""
    monkeypatch.setenv("STRUCTSPARSE_DATA", str(tmp_path / "default-cache"))
    monkeypatch.delenv("STRUCTSPARSE_CIFAR10", raising=False)
    monkeypatch.setattr(data, "CIFAR10_VAL_SIZE", 4)


# ----------------------------------------------------------------------------- CIFAR-10


class _Py2StylePickler(pickle.Pickler):
    """ndarrays as Python 2 numpy pickled them (the real batches): raw data as a latin-1 string."""

    def reducer_override(self, obj):
        if isinstance(obj, np.ndarray):
            state = (1, obj.shape, obj.dtype, False, obj.tobytes().decode("latin1"))
            return data._reconstruct, (np.ndarray, (0,), "b"), state
        return NotImplemented


def batch_bytes(x: np.ndarray, labels: list[int], bytes_keys: bool = True, py2: bool = False) -> bytes:
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    obj = {key("batch_label"): "generated", key("labels"): labels, key("data"): x.reshape(len(x), -1),
           key("filenames"): [f"img{i}.png" for i in range(len(x))]}
    if not py2:
        return pickle.dumps(obj, protocol=4)
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def tiny_cifar(directory: Path, per_batch=3, n_test=5, seed=0, **kw):
    """Write data_batch_1..5 and test_batch; return ({name: (x N×3×32×32, labels)}, {name: md5})."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays, md5s = {}, {}
    for name in (*data.CIFAR10_TRAIN_FILES, data.CIFAR10_TEST_FILE):
        n = n_test if name == data.CIFAR10_TEST_FILE else per_batch
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n)]
        raw = batch_bytes(x, y, **kw)
        (directory / name).write_bytes(raw)
        arrays[name], md5s[name] = (x, np.array(y, np.uint8)), hashlib.md5(raw).hexdigest()
    return arrays, md5s


def _expected(arrays):
    x = np.concatenate([arrays[n][0] for n in data.CIFAR10_TRAIN_FILES])
    y = np.concatenate([arrays[n][1] for n in data.CIFAR10_TRAIN_FILES])
    return {"train": (x[:-4], y[:-4]), "val": (x[-4:], y[-4:]), "test": arrays["test_batch"]}


# Python 2 pickles (the real files) have str keys, read back as str; Python 3 ones may have bytes keys.
@pytest.mark.parametrize("bytes_keys,py2", [(True, False), (False, False), (False, True)])
def test_read_cifar10(tmp_path, bytes_keys, py2):
    arrays, md5s = tiny_cifar(tmp_path / "c", bytes_keys=bytes_keys, py2=py2)
    splits = data.read_cifar10(tmp_path / "c", md5=md5s)
    for split, (x, y) in _expected(arrays).items():
        assert splits[split][0].dtype == np.uint8 and splits[split][0].shape == (len(x), 3, 32, 32)
        np.testing.assert_array_equal(splits[split][0], x)
        np.testing.assert_array_equal(splits[split][1], y)
    assert len(splits["train"][0]) == 5 * 3 - 4 and len(splits["val"][0]) == 4


def test_cifar10_published_md5s():
    assert set(data.CIFAR10_MD5) == {*data.CIFAR10_TRAIN_FILES, "test_batch"}
    assert data.CIFAR10_MD5["data_batch_1"] == "c99cafc152244af753f735de768cd75f"
    assert data.CIFAR10_MD5["test_batch"] == "40351d587109b95175f43aff81a1287e"


def test_cifar10_md5_mismatch_names_the_file(tmp_path, monkeypatch):
    tiny_cifar(tmp_path / "c")
    unpickled = []
    monkeypatch.setattr(data, "_NumpyUnpickler", lambda *a, **k: unpickled.append(1))
    with pytest.raises(ValueError, match=r"data_batch_1: MD5 mismatch"):
        data.read_cifar10(tmp_path / "c")   # the published MD5s: checked before unpickling
    with pytest.raises(ValueError, match=r"data_batch_1: MD5 mismatch"):
        data.load_dataset("cifar10", "train", root=tmp_path / "c")
    assert not unpickled


def test_cifar10_md5_opt_out(tmp_path):
    arrays, _ = tiny_cifar(tmp_path / "c")
    splits = data.read_cifar10(tmp_path / "c", md5=None)
    np.testing.assert_array_equal(splits["test"][0], arrays["test_batch"][0])


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


@pytest.mark.parametrize("payload", [
    {b"data": _Evil(), b"labels": [0]},
    _Evil(),
])
def test_cifar10_malicious_pickle_rejected(tmp_path, payload):
    tiny_cifar(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_3: refusing to load global (posix|nt|os)\.system"):
        data.read_cifar10(tmp_path / "c", md5=None)


@pytest.mark.parametrize("obj,match", [
    ([1, 2], "expected a pickled dict"),
    ({b"labels": [1]}, "no 'data' and 'labels'"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [1, 2]}, "expected a uint8 N×3072"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, "x"]}, "list of integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}, "expected 2 integers"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 10]}, "outside 0..9"),
])
def test_cifar10_bad_batches(tmp_path, obj, match):
    tiny_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps(obj, protocol=4))
    with pytest.raises(ValueError, match=match) as e:
        data.read_cifar10(tmp_path / "c", md5=None)
    assert "test_batch" in str(e.value)


def test_cifar10_truncated_file(tmp_path):
    tiny_cifar(tmp_path / "c")
    p = tmp_path / "c" / "data_batch_2"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(pickle.UnpicklingError, match="data_batch_2: pickle data was truncated"):
        data.read_cifar10(tmp_path / "c", md5=None)


@pytest.mark.parametrize("layout", ["batches-folder", "torchvision-root", "env"])
def test_load_cifar10_layouts_then_cache(tmp_path, monkeypatch, layout):
    folder = tmp_path / "tv" / data.CIFAR10_DIR
    arrays, md5s = tiny_cifar(folder)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5s)
    root = {"batches-folder": folder, "torchvision-root": tmp_path / "tv", "env": tmp_path / "cache"}[layout]
    if layout == "env":
        monkeypatch.setenv("STRUCTSPARSE_CIFAR10", str(tmp_path / "tv"))
    expected = _expected(arrays)
    x, y = data.load_dataset("cifar10", "train", root=root)
    assert x.dtype == torch.float32 and x.shape == (11, 3, 32, 32) and y.dtype == torch.int64
    torch.testing.assert_close(x, torch.from_numpy(expected["train"][0]).float() / 255)
    assert x.min() >= 0 and x.max() <= 1
    assert (root / "cifar10.npz").exists()
    for name in md5s:                     # from now on the cache alone serves every split
        (folder / name).unlink()
    for split in data.SPLITS:
        x, y = data.load_dataset("cifar10", split, root=root)
        torch.testing.assert_close(x, torch.from_numpy(expected[split][0]).float() / 255)
        assert y.tolist() == expected[split][1].tolist()


def test_load_cifar10_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cifar-10-python\.tar\.gz.*STRUCTSPARSE_CIFAR10") as e:
        data.load_dataset("cifar10", "test", root=tmp_path / "nothing")
    assert str(tmp_path / "nothing" / data.CIFAR10_DIR) in str(e.value)


def test_cifar10_corrupt_cache(tmp_path):
    (tmp_path / "cifar10.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cifar10.npz is corrupt"):
        data.load_dataset("cifar10", "val", root=tmp_path)


# ----------------------------------------------------------------------------- ImageNet-style folders


def write_image(path: Path, arr: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def image_root(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        write_image(root / split / "n02_dog" / "a.png", rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
        write_image(root / split / "n02_dog" / "b.JPEG", rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
        write_image(root / split / "n01_cat" / "c.jpg", rng.integers(0, 256, (50, 24, 3), dtype=np.uint8))
        write_image(root / split / "n01_cat" / "gray.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
        (root / split / "n01_cat" / "notes.txt").write_text("not an image")
    return root


def test_image_folder(image_root):
    ds = data.ImageFolder(image_root, "val", size=16, resize=20)
    assert ds.classes == ["n01_cat", "n02_dog"] and ds.class_to_idx == {"n01_cat": 0, "n02_dog": 1}
    assert len(ds) == 4 and [label for _, label in ds.samples] == [0, 0, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert 0 <= x.min() and x.max() <= 1
    xs, ys = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xs.shape == (4, 3, 16, 16) and ys.tolist() == [0, 0, 1, 1]


def test_image_folder_center_crop_is_exact(image_root):
    from PIL import Image
    arr = np.asarray(Image.open(image_root / "train" / "n02_dog" / "a.png"))   # 20 high, 40 wide
    ds = data.ImageFolder(image_root, "train", size=20, resize=20)             # no resampling: a pure crop
    x, _ = ds[ds.samples.index((image_root / "train" / "n02_dog" / "a.png", 1))]
    torch.testing.assert_close(x, torch.from_numpy(arr[:, 10:30].copy()).permute(2, 0, 1).float() / 255)


def test_image_folder_default_resize(image_root):
    ds = data.ImageFolder(image_root, "train", size=224)
    assert ds.resize == 256 and ds[0][0].shape == (3, 224, 224)


def test_image_folder_errors(image_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="test: no such folder"):
        data.ImageFolder(image_root, "test")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="no class folders"):
        data.ImageFolder(tmp_path / "empty")
    (image_root / "train" / "n03_empty").mkdir()
    (image_root / "train" / "n03_empty" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"n03_empty: no images"):
        data.ImageFolder(image_root, "train")
    with pytest.raises(ValueError, match="resize >= size"):
        data.ImageFolder(image_root, "val", size=32, resize=16)


def test_image_folder_unreadable_image(image_root):
    (image_root / "val" / "n01_cat" / "c.jpg").write_bytes(b"garbage")
    ds = data.ImageFolder(image_root, "val", size=8)
    with pytest.raises(ValueError, match=r"c\.jpg: cannot read image"):
        ds[0]


def test_image_folder_without_pillow(image_root, monkeypatch):
    ds = data.ImageFolder(image_root, "val", size=8)   # listing files needs no Pillow
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"structsparse\[imagenet\]"):
        ds[0]


# ----------------------------------------------------------------------------- augmentation


def _batch(n=64, c=3, h=8, w=10, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_random_crop_flip_shape_and_determinism():
    x = _batch()
    a = data.random_crop_flip(x, 4, generator=torch.Generator().manual_seed(1))
    b = data.random_crop_flip(x, 4, generator=torch.Generator().manual_seed(1))
    c = data.random_crop_flip(x, 4, generator=torch.Generator().manual_seed(2))
    assert a.shape == x.shape and a.dtype == x.dtype and a.is_contiguous()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_identity_without_padding_or_flip():
    x = _batch()
    assert torch.equal(data.random_crop_flip(x, 0, flip=False, generator=torch.Generator().manual_seed(0)), x)


def test_flips_really_flip():
    x = _batch()
    out = data.random_crop_flip(x, 0, flip=True, generator=torch.Generator().manual_seed(0))
    same = [torch.equal(o, i) for o, i in zip(out, x)]
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, x)]
    assert all(s != f for s, f in zip(same, flipped))      # each image: exactly one of the two
    assert 16 < sum(flipped) < 48                           # about half of 64


@pytest.mark.parametrize("flip", [False, True])
def test_crops_are_crops_of_the_padded_image(flip):
    p = 2
    x = _batch(n=16)
    out = data.random_crop_flip(x, p, flip=flip, generator=torch.Generator().manual_seed(3))
    padded = torch.nn.functional.pad(x, (p,) * 4)
    offsets = set()
    for o, img in zip(out, padded):
        hits = [(dy, dx, fl) for dy in range(2 * p + 1) for dx in range(2 * p + 1) for fl in ((False, True) if flip else (False,))
                if torch.equal(o, (img.flip(-1) if fl else img)[:, dy:dy + 8, dx:dx + 10])]
        assert hits, "output is not a crop of the padded image"
        offsets.add(hits[0][:2])
    assert len(offsets) > 3   # offsets really vary


def test_random_crop_flip_bad_input():
    with pytest.raises(ValueError, match="N×C×H×W"):
        data.random_crop_flip(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="padding"):
        data.random_crop_flip(torch.zeros(1, 3, 8, 8), padding=-1)
