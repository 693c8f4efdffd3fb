"""Small builders shared by several test files (importable because tests/ is on sys.path under pytest)."""
from pathlib import Path

import numpy as np


def write_tiny_mnist(root: Path, sizes=(256, 100, 100), seed: int = 0) -> None:
    """A learnable stand-in for MNIST in data.py's cache format (uint8 N×28×28 images and labels):
    noise plus a bright bar whose position encodes the label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(("train", "val", "test"), sizes):
        y = rng.integers(0, 10, n).astype(np.uint8)
        x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(y):
            x[i, 2 + 2 * label: 4 + 2 * label, 4:24] = 250
        arrays[f"{split}_x"], arrays[f"{split}_y"] = x, y
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / "mnist.npz", **arrays)
