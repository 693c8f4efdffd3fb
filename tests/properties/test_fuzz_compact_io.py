"""Fuzzing ``load_compact`` with damaged files (the harness and the property: :mod:`fuzzing`)."""
import json
import re
import struct
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from fuzzing import (ARCH, CLAIMED_SIZES, HUGE_ACTIVATIONS, WEIGHTS, address_space_headroom,  # noqa: E402
                     arch_edit, damaged_bytes, header_size, judge_compact, mutated_json, mutated_tensors,
                     no_input_shape, save_or_reject)
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.torch import load as st_load  # noqa: E402

from structsparse import load_compact  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("with_shape", [True, False], ids=["input-shape", "no-input-shape"])
@pytest.mark.parametrize("case", sorted(CLAIMED_SIZES))
def test_claimed_sizes_are_not_allocated(case, with_shape, saved_compact, tmp_path):
    d = arch_edit(saved_compact, tmp_path / "d", no_input_shape(CLAIMED_SIZES[case]) if not with_shape
                   else CLAIMED_SIZES[case])
    with pytest.raises(ValueError, match=re.escape(str(d))) as e, address_space_headroom(512 * 2 ** 20):
        load_compact(d)
    message = str(e.value)  # the header check, or the dry run on meta tensors
    assert re.search(r"model\.safetensors: .*(has shape|do not match)|architecture\.json: the model it describes "
                     r"fails", message) and "allocate" not in message, message


@pytest.mark.parametrize("case", sorted(HUGE_ACTIVATIONS))
def test_huge_activations_are_refused_before_running(case, saved_compact, tmp_path):
    d = arch_edit(saved_compact, tmp_path / "d", HUGE_ACTIVATIONS[case])
    with pytest.raises(ValueError, match=re.escape(str(d / ARCH))) as e, address_space_headroom(512 * 2 ** 20):
        load_compact(d)
    assert re.search(r"at most \d+ are allowed", str(e.value)), str(e.value)


@given(data=st.data())
def test_load_compact_survives_damaged_bytes(saved_compact, fuzz_stats, data):
    which = data.draw(st.sampled_from([ARCH, WEIGHTS]))
    hot = header_size(saved_compact.files[WEIGHTS]) if which == WEIGHTS else 0
    damaged = data.draw(damaged_bytes(saved_compact.files[which], hot))
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_compact.write(Path(tmp) / "m", **{which: damaged})
        judge_compact(fuzz_stats, f"load_compact, damaged {which} bytes", d)


@given(data=st.data())
def test_load_compact_survives_edited_description(saved_compact, fuzz_stats, data):
    text = data.draw(mutated_json(saved_compact.json(ARCH)))
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_compact.write(Path(tmp) / "m", **{ARCH: text.encode()})
        judge_compact(fuzz_stats, "load_compact, edited architecture.json", d)


@given(data=st.data())
def test_load_compact_survives_edited_weights(saved_compact, fuzz_stats, data):
    original = saved_compact.files[WEIGHTS]
    if data.draw(st.booleans()):  # tensors: keys, dtypes, shapes, indices out of range
        names = ["fc1.weight", "conv2.columns.x", "bn1.num_batches_tracked", "__metadata__", ""]
        weights = save_or_reject(data.draw(mutated_tensors(st_load(original), names)))
    else:  # the safetensors header itself: dtypes, shapes, data offsets, metadata
        n = header_size(original)
        header = json.loads(original[8:n])
        text = data.draw(mutated_json(header)).encode()
        weights = struct.pack("<Q", len(text)) + text + original[n:]
    with tempfile.TemporaryDirectory() as tmp:
        d = saved_compact.write(Path(tmp) / "m", **{WEIGHTS: weights})
        judge_compact(fuzz_stats, "load_compact, edited model.safetensors", d)
