"""Make the in-tree ``structsparse`` package importable when running pytest without installing it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
