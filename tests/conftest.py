"""Make the in-tree ``structsparse`` package importable when running pytest without installing it."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # helpers.py, for the test files in sub-folders

import os

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread. With two OpenMP threads on a busy 2-core machine every
    small op waits for the other thread (~20 ms per conv instead of ~0.5 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``slow`` (full reproductions) unless STRUCTSPARSE_SLOW=1."""
    if os.environ.get("STRUCTSPARSE_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set STRUCTSPARSE_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ---- hypothesis profiles -------------------------------------------------------------------
# "ci" (the default) keeps the property and fuzz tests to a few seconds each and always tries
# the same examples (derandomize), so a red CI run is reproducible and never a coin toss;
# "long" explores at random: STRUCTSPARSE_HYPOTHESIS_PROFILE=long pytest tests/test_fuzz_io.py ...
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a test extra; the tests that need it skip without it
    pass
else:
    _slow_ok = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                              suppress_health_check=_slow_ok, print_blob=True)
    settings.register_profile("long", max_examples=300, deadline=None, suppress_health_check=_slow_ok,
                              print_blob=True)
    settings.load_profile(os.environ.get("STRUCTSPARSE_HYPOTHESIS_PROFILE", "ci"))

_FUZZ_STATS = pytest.StashKey[dict]()


@pytest.fixture(scope="session")
def fuzz_stats(pytestconfig):
    """A session-wide tally (name → count) that is printed at the end of the run."""
    return pytestconfig.stash.setdefault(_FUZZ_STATS, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    stats = config.stash.get(_FUZZ_STATS, None)
    if stats:
        terminalreporter.section("fuzzing and property tests: examples tried")
        for name in sorted(stats):
            terminalreporter.write_line(f"{name}: {stats[name]}")
