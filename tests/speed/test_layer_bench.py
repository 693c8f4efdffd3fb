import pytest
import torch
import torch.nn.functional as F

from structsparse.speed.layer_bench import (ALEXNET, ConvShape, _GroupedCompact, lowered_conv, alexnet_table4, column_sweep,
                                sparse_conv_weight, table4_markdown)


@pytest.mark.parametrize("groups", [1, 2])
def test_benchmarked_implementations_compute_the_same_conv(groups):
    shape = ConvShape("c", 8, 6, 3, 2, 1, groups, 9)
    w = sparse_conv_weight(shape, groups, row=0.34, column=0.5, seed=3)
    b = torch.randn(6)
    x = torch.rand(2, 8, 9, 9)
    ref = F.conv2d(x, w, b, 2, 1, 1, groups)
    assert torch.allclose(lowered_conv(w, b, shape, groups, sparse=False)(x), ref, atol=1e-5)
    assert torch.allclose(lowered_conv(w, b, shape, groups, sparse=True)(x), ref, atol=1e-5)
    compact = _GroupedCompact(w, b, shape, groups)(x)
    kept = w.flatten(1).ne(0).any(dim=1)  # compact drops zero filters (their bias only)
    assert torch.allclose(compact, ref[:, kept], atol=1e-5)


def test_sparse_weights_have_exact_sparsity():
    shape = ALEXNET[2]
    w = sparse_conv_weight(shape, 1, row=0.406, column=0.769)
    m = w.flatten(1)
    assert int((~m.ne(0).any(dim=1)).sum()) == round(0.406 * 384)
    assert int((~m.ne(0).any(dim=0)).sum()) == round(0.769 * 256 * 9)
    u = sparse_conv_weight(shape, 1, unstructured=0.9)
    assert int(u.eq(0).sum()) == round(0.9 * u.numel())


def test_table4_and_sweep_run_on_a_tiny_budget():
    res = alexnet_table4(rows=(2, 1), batch_sizes=(1,), threads=(1,), groups=("caffe",), repeats=1, warmup=0)
    assert len(res["results"]) == 10 and all(r["vs_conv2d"] > 0 for r in res["results"])
    assert {r["groups_mode"] for r in res["results"]} == {"caffe"}
    assert "compact faster than CSR on" in table4_markdown(res)
    sweep = column_sweep(ConvShape("c", 16, 16, 3, 1, 1, 1, 8), sparsities=(0.0, 0.5), repeats=1, warmup=0)
    assert [r["sparsity"] for r in sweep["results"]] == [0.0, 0.5]
