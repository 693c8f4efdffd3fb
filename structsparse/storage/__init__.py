"""Files: compact models (:mod:`.compact_io`), checkpoints (:mod:`.checkpoint`), ONNX (:mod:`.export`),
atomic writes (:mod:`.files`)."""
from .checkpoint import CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from .compact_io import load_compact, save_compact
from .export import ONNXExportError, export_onnx
from .files import atomic_write

__all__ = ["load_compact", "save_compact", "export_onnx", "ONNXExportError", "save_checkpoint", "load_checkpoint",
           "has_checkpoint", "CheckpointError", "atomic_write"]
