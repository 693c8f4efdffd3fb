"""PNGs of an MNIST row's trained (uncompacted) weights: conv1's filters and the lowered weight matrices
with removed rows/columns (LeNet), or the kept input pixels and weight matrices (MLP)."""
from __future__ import annotations

from pathlib import Path

from structsparse.paper import PAPER_MNIST


def conv1_filters(plt, np, sd: dict, title: str, path: Path) -> None:
    """LeNet's 20 conv1 filters, the all-zero ones marked."""
    w1 = sd["conv1.weight"].numpy()[:, 0]
    fig, axes = plt.subplots(2, 10, figsize=(10, 3.0))
    vmax = float(np.abs(w1).max()) or 1.0
    for i, ax in enumerate(axes.flat):
        ax.imshow(w1[i], cmap="bwr", vmin=-vmax, vmax=vmax)
        ax.set_xticks([]), ax.set_yticks([])
        zero = not np.any(w1[i])
        ax.set_title(f"{i}" + (" (0)" if zero else ""), fontsize=7, color="grey" if zero else "black", pad=2)
    fig.suptitle(f"{title}: conv1 filters after SSL + fine-tuning (all-zero filters marked (0))", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def input_pixels(plt, np, sd: dict, title: str, path: Path) -> None:
    """The MLP's input pixels that fc1 still reads."""
    w1 = sd["fc1.weight"].numpy()
    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(np.any(w1 != 0, axis=0).reshape(28, 28), cmap="gray")
    ax.set_title(f"{title}: input pixels read by fc1", fontsize=8)
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def weight_matrices(plt, np, mats: list, lenet: bool, path: Path) -> None:
    """Each (name, matrix): nonzero black, removed rows and columns grey, zeros inside white."""
    fig, axes = plt.subplots(1, len(mats), figsize=(5 * len(mats), 3.2))
    for ax, (n, m) in zip(np.atleast_1d(axes), mats):
        nz = m != 0
        rows, cols = nz.any(axis=1), nz.any(axis=0)
        img = np.where(nz, 1.0, 0.0)
        img[~rows, :] = 0.35   # removed rows (filters / output neurons)
        img[:, ~cols] = 0.35   # removed columns (shapes / channels / input neurons)
        ax.imshow(img, cmap="gray_r", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_title(f"{n}: {int(rows.sum())}/{m.shape[0]} rows, {int(cols.sum())}/{m.shape[1]} columns kept\n"
                     "(black: nonzero, grey: removed row/column, white: zero inside)", fontsize=8)
        ax.set_xlabel("column (input channel x kernel position)" if lenet else "column (input neuron)", fontsize=7)
        ax.set_ylabel("row (filter)" if lenet else "row (output neuron)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figures(name: str, run_dir: Path, out_dir: Path, model_name: str) -> list[str]:
    """Write the row's PNGs from ``run_dir/trained.safetensors`` into ``out_dir``; their file names
    (none without matplotlib or the trained weights)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from safetensors.torch import load_file
    except ImportError:
        return []
    trained = run_dir / "trained.safetensors"
    if not trained.is_file():
        return []
    sd = load_file(trained)
    title = PAPER_MNIST[name]["paper_row"]
    lenet = model_name == "lenet"
    if lenet:
        first = "conv1_filters.png"
        conv1_filters(plt, np, sd, title, out_dir / first)
        mats = [("conv1", sd["conv1.weight"].numpy().reshape(20, -1)),
                ("conv2", sd["conv2.weight"].numpy().reshape(50, -1))]
    else:
        first = "input_pixels.png"
        input_pixels(plt, np, sd, title, out_dir / first)
        mats = [(n, sd[f"{n}.weight"].numpy()) for n in ("fc1", "fc2", "fc3")]
    weight_matrices(plt, np, mats, lenet, out_dir / "weight_matrices.png")
    return [first, "weight_matrices.png"]
