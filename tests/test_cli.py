"""The command line: arguments, one-line errors and exit codes (what `run` and `bench` do is tested in
tests/runner/ and tests/speed/)."""
import pytest
import yaml

from structsparse import cli


def test_bad_recipe_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "lenet", "data": "mnist", "phases": [{"name": "x", "epochs": 1, "lr": 0.1, "lamdas": {}}]}))
    assert cli.main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}: phases[0].lamdas: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bench", "alexnet-table4", "--rows", "3"], "no Table 4 row"),
    (["bench", "alexnet-table4", "--groups", "4"], "--groups"),
    (["bench", "sweep", "--layer", "conv9"], "unknown layer"),
    (["bench", "sweep", "--batch", "x"], "--batch"),
    (["bench", "model", "/nonexistent-run"], "metrics.json"),
])
def test_bench_bad_arguments_are_named(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    from structsparse import cli as cli_module

    def interrupted():
        raise KeyboardInterrupt   # as if Ctrl-C came while the parser was built (or torch imported)

    monkeypatch.setattr(cli_module, "build_parser", interrupted)
    assert cli_module.main(["run", "x.yaml", "--out", "o"]) == 130
    assert capsys.readouterr().err.strip() == "structsparse: interrupted; continue with --resume"


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """The real entry point (``python -m structsparse``), interrupted inside ``import torch``: a stand-in torch
    first on the path sends the process SIGINT while it is imported."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "fake" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake.parent), str(root)])}
    proc = subprocess.run([sys.executable, "-m", "structsparse", "run", "x.yaml", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "structsparse: interrupted; continue with --resume"
    assert not (tmp_path / "o").exists()
