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
