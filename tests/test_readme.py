"""The README's own-loop snippet runs as pasted and does what its text says."""
import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _snippet() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it in your own training loop"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.usefixtures("one_thread")
def test_the_own_loop_snippet_runs_as_pasted_and_removes_filters(tmp_path, capsys):
    cwd = os.getcwd()
    os.chdir(tmp_path)   # it saves "my-ssl-model" where it runs
    try:
        scope: dict = {}
        exec(compile(_snippet(), "README.md", "exec"), scope)
    finally:
        os.chdir(cwd)
    model, small = scope["model"], scope["small"]
    kept = dict(small.steps())
    assert kept["0"].out_channels < 16 and kept["3"].out_channels < 32           # most filters went ...
    assert (tmp_path / "my-ssl-model" / "model.safetensors").exists()
    with torch.no_grad():                                                       # ... and nothing else changed
        torch.testing.assert_close(small(scope["x"]), model(scope["x"]), rtol=1e-4, atol=1e-5)
    assert "speedup" in capsys.readouterr().out
