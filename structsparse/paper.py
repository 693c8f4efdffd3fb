"""The paper's figures (Wen et al., NIPS 2016) and the layer shapes they were measured on.

Data only, read by the layer benchmarks (:mod:`structsparse.speed.layer_bench`), the model zoo
(:mod:`structsparse.zoo.models`) and the experiments that compare against the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ConvShape", "ALEXNET", "PAPER_TABLE4", "PAPER_MNIST"]


@dataclass(frozen=True)
class ConvShape:
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    in_size: int


# CaffeNet conv1–conv5 (groups=2 in conv2, conv4, conv5), with their input sizes.
ALEXNET = (
    ConvShape("conv1", 3, 96, 11, 4, 0, 1, 227),
    ConvShape("conv2", 96, 256, 5, 1, 2, 2, 27),
    ConvShape("conv3", 256, 384, 3, 1, 1, 1, 13),
    ConvShape("conv4", 384, 384, 3, 1, 1, 2, 13),
    ConvShape("conv5", 384, 256, 3, 1, 1, 2, 13),
)

# The paper's Table 4 (AlexNet on ImageNet): sparsity per layer and its speedups against the
# lowered-GEMM baseline (CPU: MKL, one thread; GPU: cuBLAS on a GTX Titan Black).
PAPER_TABLE4 = {
    1: {"method": "l1", "top1_error": 0.4467, "sparsity": [0.676, 0.924, 0.972, 0.966, 0.943],
        "cpu": [0.80, 2.91, 4.84, 3.83, 2.76], "gpu": [0.25, 0.52, 1.38, 1.04, 1.36]},
    2: {"method": "ssl", "top1_error": 0.4466, "column": [0.0, 0.632, 0.769, 0.847, 0.807],
        "row": [0.094, 0.129, 0.406, 0.469, 0.0],
        "cpu": [1.05, 3.37, 6.27, 9.73, 4.93], "gpu": [1.00, 2.37, 4.94, 4.03, 3.05]},
    4: {"method": "l1", "top1_error": 0.4251, "sparsity": [0.147, 0.762, 0.853, 0.815, 0.763],
        "cpu": [0.34, 0.99, 1.30, 1.10, 0.93], "gpu": [0.08, 0.17, 0.42, 0.30, 0.32]},
    5: {"method": "ssl", "top1_error": 0.4253, "column": [0.0, 0.209, 0.397, 0.397, 0.246],
        "row": [0.0] * 5, "cpu": [1.00, 1.27, 1.64, 1.68, 1.32], "gpu": [1.00, 1.25, 1.63, 1.72, 1.36]},
}

# The paper's rows (Wen et al. 2016, MNIST tables; see the project's reference notes).
PAPER_MNIST = {
    "lenet1": {"paper_row": "LeNet 1", "model": "lenet", "error": 0.009, "filters": [20, 50], "channels": [1, 20],
               "filter_size": [25, 500], "flop": [1.0, 1.0]},
    "lenet2": {"paper_row": "LeNet 2", "model": "lenet", "error": 0.008, "filters": [5, 19], "channels": [1, 4],
               "flop": [0.25, 0.076], "speedup": [1.64, 5.23]},
    "lenet3": {"paper_row": "LeNet 3", "model": "lenet", "error": 0.010, "filters": [3, 12], "channels": [1, 3],
               "flop": [0.15, 0.036], "speedup": [1.99, 7.44]},
    "lenet4": {"paper_row": "LeNet 4", "model": "lenet", "error": 0.008, "filter_size": [21, 41], "channels": [1, 2],
               "flop": [0.084, 0.082], "speedup": [2.33, 6.93]},
    "lenet5": {"paper_row": "LeNet 5", "model": "lenet", "error": 0.010, "filter_size": [7, 14], "channels": [1, 1],
               "flop": [0.014, 0.028], "speedup": [5.19, 10.82]},
    "mlp1": {"paper_row": "MLP 1", "model": "mlp", "error": 0.0143, "neurons": [784, 500, 300, 10],
             "flop": [1.0, 1.0, 1.0]},
    "mlp2": {"paper_row": "MLP 2", "model": "mlp", "error": 0.0134, "neurons": [469, 294, 166, 10],
             "flop": [0.3518, 0.3254, 0.5533]},
    "mlp3": {"paper_row": "MLP 3", "model": "mlp", "error": 0.0153, "neurons": [434, 174, 78, 10],
             "flop": [0.1926, 0.0905, 0.2600]},
}
