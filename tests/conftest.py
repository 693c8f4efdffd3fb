"""Make the in-tree ``structsparse`` package importable when running pytest without installing it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import os

import pytest


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``slow`` (full reproductions) unless STRUCTSPARSE_SLOW=1."""
    if os.environ.get("STRUCTSPARSE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set STRUCTSPARSE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
