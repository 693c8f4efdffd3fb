"""ONNX export of compact (or any) models, checked against PyTorch with ONNX Runtime.

``export_onnx(model, example_input, path)`` hands the ``nn.Module`` to torch's own exporter,
so anything it can export works: every step of a compact model (Conv2d, Linear,
BatchNorm, pooling, :class:`~structsparse.compaction.kernels.LoweredConv2d`, ``IndexSelect``, ``Op``,
the multi-input modules of :mod:`structsparse.layers`) and plain models. The exporter is
torch's ``torch.export``-based one (``dynamo=True``, needs ``onnxscript``); where that is
missing or fails, the TorchScript-based one is tried. With ``check`` the written bytes
are run by ONNX Runtime on the example input (and, with a dynamic batch, on a batch of
another size) and compared with PyTorch. Needs ``pip install 'structsparse[export]'``.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .files import atomic_write

__all__ = ["export_onnx", "ONNXExportError", "ort_session", "RTOL", "ATOL"]

RTOL, ATOL = 1e-4, 1e-5
EXPORTERS = ("auto", "dynamo", "torchscript")
_INSTALL = "pip install 'structsparse[export]'"


class ONNXExportError(RuntimeError):
    """The model could not be exported, or ONNX Runtime's outputs differ from PyTorch's."""


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _dynamo_available() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters and _has("onnxscript")


@contextlib.contextmanager
def _quiet():
    """Silence the exporters' progress lines, deprecation and tracer warnings (errors still raise)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _names(prefix: str, n: int) -> list[str]:
    return [prefix] if n == 1 else [f"{prefix}_{i}" for i in range(n)]


def _leaves(out: Any) -> list[torch.Tensor]:
    leaves = torch.utils._pytree.tree_leaves(out)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        raise TypeError(f"outputs must be tensors (or tuples, lists, dicts of tensors), got {type(out).__name__}")
    return leaves


def _export_dynamo(model, inputs, opset, dynamic_batch, input_names, output_names) -> bytes:
    dynamic_shapes = None
    if dynamic_batch:  # one shared batch dimension when the inputs agree on it
        sizes = {x.shape[0] for x in inputs}
        dims = [torch.export.Dim("batch")] * len(inputs) if len(sizes) == 1 else \
            [torch.export.Dim(f"batch_{i}") for i in range(len(inputs))]
        dynamic_shapes = tuple({0: d} for d in dims)
    program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=dynamic_shapes,
                                input_names=input_names, output_names=output_names, external_data=False,
                                optimize=True, verbose=False)
    return program.model_proto.SerializeToString()


def _export_torchscript(model, inputs, opset, dynamic_batch, input_names, output_names) -> bytes:
    buf = io.BytesIO()
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    axes = {name: {0: "batch"} for name in input_names + output_names} if dynamic_batch else None
    torch.onnx.export(model, inputs, buf, opset_version=opset or 17, input_names=input_names,
                      output_names=output_names, dynamic_axes=axes, do_constant_folding=True, **kwargs)
    return buf.getvalue()


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session of an ONNX file (or its bytes); ``threads`` sets its intra-op
    threads (``None`` or 0: ONNX Runtime's default, all cores)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"onnxruntime is not installed: {_INSTALL}") from e
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def _compare(what: str, session, model: nn.Module, inputs: tuple[torch.Tensor, ...], hint: str = "") -> None:
    try:
        with torch.no_grad():
            expected = _leaves(model(*inputs))
    except Exception as e:
        raise ONNXExportError(f"{what}: the model itself fails in PyTorch ({type(e).__name__}: {e}){hint}") from e
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    try:
        got = session.run(None, feeds)
    except Exception as e:  # onnxruntime raises its own exception types
        raise ONNXExportError(f"{what}: ONNX Runtime could not run the exported model: {e}{hint}") from e
    if len(got) != len(expected):
        raise ONNXExportError(f"{what}: ONNX Runtime returned {len(got)} outputs, PyTorch {len(expected)}")
    for i, (g, e) in enumerate(zip(got, expected)):
        g, e = torch.from_numpy(g), e.detach().cpu()
        if g.shape != e.shape:
            raise ONNXExportError(f"{what}: output {i} has shape {list(g.shape)} in ONNX Runtime, "
                                  f"{list(e.shape)} in PyTorch{hint}")
        if not torch.allclose(g.to(e.dtype), e, rtol=RTOL, atol=ATOL, equal_nan=True):
            diff = (g.to(e.dtype) - e).abs().max().item() if e.is_floating_point() else "values differ"
            raise ONNXExportError(f"{what}: ONNX Runtime's output {i} differs from PyTorch's "
                                  f"(max abs diff {diff}; rtol {RTOL}, atol {ATOL}){hint}")


def _check_arguments(what: str, example_input, check, exporter: str, dynamic_batch: bool) -> tuple:
    """The example inputs as a tuple, once the arguments of :func:`export_onnx` are found valid."""
    inputs = (example_input,) if isinstance(example_input, torch.Tensor) else example_input
    if not isinstance(inputs, (tuple, list)) or not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise TypeError(f"{what}: example_input must be a tensor or a tuple of tensors, "
                        f"got {type(example_input).__name__}")
    if check not in (True, False, "require"):
        raise ValueError(f"{what}: check must be True, False or 'require', got {check!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"{what}: exporter must be one of {EXPORTERS}, got {exporter!r}")
    if dynamic_batch and any(x.dim() == 0 for x in inputs):
        raise ValueError(f"{what}: dynamic_batch needs inputs with a batch dimension; got a 0-d tensor "
                         "(pass dynamic_batch=False)")
    return tuple(inputs)


def _export(what: str, model: nn.Module, inputs: tuple, opset, dynamic_batch: bool, exporter: str) -> bytes:
    """The ONNX bytes of ``model`` (in eval mode), from the exporters ``exporter`` names, in order."""
    try:
        with torch.no_grad():
            outputs = model(*inputs)
    except Exception as e:
        raise ONNXExportError(f"{what}: the model fails on example_input in PyTorch "
                              f"({type(e).__name__}: {e})") from e
    try:
        outputs = _leaves(outputs)
    except TypeError as e:
        raise TypeError(f"{what}: {e}") from None
    # A batch of 1 would be specialised by torch.export: trace with the example repeated.
    traced = tuple(torch.cat([x, x]) if dynamic_batch and x.shape[0] == 1 else x for x in inputs)
    args = (model, traced, opset, dynamic_batch, _names("input", len(inputs)), _names("output", len(outputs)))
    order = ["dynamo", "torchscript"] if exporter == "auto" and _dynamo_available() else \
        ["torchscript"] if exporter == "auto" else [exporter]
    failures, cause = [], None
    for name in order:
        try:
            with _quiet():
                return (_export_dynamo if name == "dynamo" else _export_torchscript)(*args)
        except Exception as e:  # the exporters raise many types; each is reported below
            cause = e
            first = (str(e).strip().splitlines() or [""])[0][:300]
            failures.append(f"the {name} exporter failed with {type(e).__name__}: {first}")
            if name != order[-1]:
                warnings.warn(f"{what}: {failures[-1]}; trying {order[-1]}", stacklevel=3)
    raise ONNXExportError(f"{what}: could not export the model to ONNX: " + "; ".join(failures)) from cause


def export_onnx(model: nn.Module, example_input: torch.Tensor | Sequence[torch.Tensor], path: str | os.PathLike, *,
                opset: int | None = None, dynamic_batch: bool = True, check: bool | str = True,
                exporter: str = "auto") -> Path:
    """Write ``model`` (in eval mode) as an ONNX file at ``path`` (atomically) and return the path.

    ``example_input`` is one tensor, or a tuple of tensors for a model with several inputs.
    ``opset``: the ONNX opset (default: the exporter's). ``dynamic_batch``: dimension 0 of
    every input and output is left free, so that any batch size runs. ``check``: run the
    bytes with ONNX Runtime on ``example_input`` (and on a batch twice as large with
    ``dynamic_batch``) and raise :class:`ONNXExportError` if the outputs differ from
    PyTorch's (rtol 1e-4, atol 1e-5); if onnxruntime is not installed, ``True`` warns
    that the check was skipped and ``"require"`` raises. ``exporter``: ``"dynamo"``
    (torch.export-based, needs onnxscript), ``"torchscript"``, or ``"auto"`` (dynamo when
    available, falling back to TorchScript with a warning if it fails).
    """
    kind = type(model).__name__
    if not isinstance(model, nn.Module):
        raise TypeError(f"export_onnx expects an nn.Module, got {kind}")
    what = f"export_onnx({kind})"
    inputs = _check_arguments(what, example_input, check, exporter, dynamic_batch)
    run_check = bool(check) and _has("onnxruntime")
    if check and not run_check:
        if check == "require":
            raise ImportError(f"{what}: check='require' needs onnxruntime: {_INSTALL}")
        else:
            warnings.warn(f"{what}: onnxruntime is not installed, so the exported file was not checked "
                          f"against PyTorch ({_INSTALL})", stacklevel=2)
    if exporter == "dynamo" and not _dynamo_available():
        raise ImportError(f"{what}: the dynamo exporter needs torch>=2.5 and onnxscript: {_INSTALL}")
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        data = _export(what, model, inputs, opset, dynamic_batch, exporter)
        if run_check:
            try:
                session = ort_session(data)
            except Exception as e:
                raise ONNXExportError(f"{what}: ONNX Runtime cannot load the exported model: {e}") from e
            _compare(what, session, model, inputs)
            if dynamic_batch:
                _compare(f"{what} at batch {2 * inputs[0].shape[0]} (dynamic batch)", session, model,
                         tuple(torch.cat([x, x]) for x in inputs),
                         hint="; if the model runs only at the example's batch size, pass dynamic_batch=False")
    finally:
        model.train(was_training)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path
