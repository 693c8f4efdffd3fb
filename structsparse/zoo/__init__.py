"""The models (:mod:`.models`) and data sets (:mod:`.data`) that recipes name."""
from .models import MODELS, build_model

__all__ = ["MODELS", "build_model"]
