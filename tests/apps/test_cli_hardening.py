"""The command line's rough edges (issue 14): numbers validated, --version, readable --help."""

import argparse

import pytest

import torchlns
from torchlns.__main__ import build_parser, main


def subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, action.choices


@pytest.mark.parametrize("argv", [["formats", "--n", "0"], ["formats", "--n", "-5"], ["formats", "--n", "x"],
                                  ["formats", "--seed", "-1"], ["demo", "--n-train", "0"], ["demo", "--size", "0", "8"],
                                  ["detect-demo", "--clusters", "-3"], ["demo", "--train-steps", "-1"]])
def test_cli_numbers_are_validated(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "expected a positive integer" in err or "expected an integer >= 0" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"torchlns {torchlns.__version__}"


def test_every_option_has_help_and_no_rst():
    parser, commands = subparsers()
    for name, sub in commands.items():
        assert "``" not in (sub.description or ""), name
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
            assert "``" not in action.help, f"{name} {action.dest}"


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("torchlns: error: "), err
    for n in needles:
        assert n in err, err
    return err


def test_truncated_torch_file_is_one_line(tmp_path, capsys):
    import torch

    good = tmp_path / "good.pt"
    torch.save({"a": torch.randn(1000), "b": torch.randn(10)}, good)
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 30):  # a bad header, a cut archive, a cut directory
        bad = tmp_path / f"cut{cut}.pt"
        bad.write_bytes(data[:cut])
        _one_line_error(capsys, ["report", str(bad)], "not a readable torch file")
        _one_line_error(capsys, ["report", str(bad), "--trust-pickle"], "not a readable torch file")


def test_model_class_must_be_a_module_path(tmp_path, capsys):
    import torch

    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.randn(2)}, sd)
    for spec in ["../etc:passwd", "/etc/passwd:x", "os:system()", ".relative:Net"]:
        _one_line_error(capsys, ["compare", str(sd), str(sd), "--model-class", spec, "--data", str(sd)],
                        "--model-class", "not a dotted module path")


class _RunsACommand:
    def __reduce__(self):
        import os

        return (os.system, ("echo this must never run",))


def test_a_pickle_that_runs_commands_is_named_and_refused(tmp_path, capsys):
    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_RunsACommand(), protocol=2))
    for extra in ([], ["--trust-pickle"]):
        err = _one_line_error(capsys, ["report", str(evil), *extra], "system", "runs commands")
        assert "not a readable torch file" not in err
    assert "this must never run" not in capsys.readouterr().out


def test_progress_is_log_lines_off_a_terminal(capsys):
    from torchlns.apps.demo import LogProgress, _progress

    bar = _progress(range(8), "training")  # pytest's stderr is not a terminal
    assert isinstance(bar, LogProgress)
    for _ in range(8):
        bar.update(1)
        bar.set_postfix(loss="0.500")
    bar.close()
    assert list(LogProgress(range(3), "eval")) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.strip().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines[:4]] == ["25%", "50%", "75%", "100%"]
    assert lines[0].startswith("training: 25% (2/8) in ") and lines[0].endswith("loss=0.500")
    assert len(lines) == 8  # four for each bar
