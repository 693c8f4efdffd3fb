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
