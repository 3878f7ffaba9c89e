"""The common command-line options are defined once (dcae.utils.cliargs) and every command uses that definition:
the whole `dcae` parser is walked, subcommand by subcommand. No model is loaded."""

from __future__ import annotations

import argparse

import pytest

from dcae.cli import build_parser
from dcae.diffusion.solvers import EXPORT_SOLVERS, FLOW_MODEL_SOLVERS, SAMPLE_SOLVERS, SOLVERS
from dcae.utils.cliargs import DTYPE_NAMES, SHARED, positive_int

# option string -> the kind cliargs marks its actions with
SHARED_OPTIONS = {
    "--device": "device",
    "--dtype": "dtype",
    "--text-dtype": "dtype",
    "--batch-size": "batch-size",
    "--solver": "solver",
    "--seed": "seed",
    "--overwrite": "overwrite",
    "--output": "output",
}
SOLVER_TABLES = (SOLVERS, FLOW_MODEL_SOLVERS, SAMPLE_SOLVERS, EXPORT_SOLVERS)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("dcae",)):
    """(command path, parser) of `parser` and of every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def actions():
    """(command, option string, action) of every option of every command."""
    for path, parser in commands(build_parser()):
        for action in parser._actions:
            for option in action.option_strings:
                yield " ".join(path), option, action


ACTIONS = list(actions())


def test_the_walk_sees_every_command():
    seen = {command for command, _, _ in ACTIONS}
    for command in ("dcae encode", "dcae sample", "dcae t2i cache", "dcae t2i eval", "dcae bench ae", "dcae fid"):
        assert command in seen


def test_common_options_come_from_cliargs():
    found = {kind: 0 for kind in SHARED_OPTIONS.values()}
    for command, option, action in ACTIONS:
        kind = SHARED_OPTIONS.get(option)
        if kind is None:
            continue
        assert getattr(action, SHARED, None) == kind, f"`{command} {option}` is defined by hand, not by cliargs"
        found[kind] += 1
    assert found["device"] >= 9 and found["dtype"] >= 8 and found["batch-size"] >= 6 and found["solver"] >= 3


def test_dtype_choices_are_the_devices_table():
    for command, option, action in ACTIONS:
        if getattr(action, SHARED, None) == "dtype":
            names = [c for c in action.choices if c != "auto"]
            assert set(names) <= set(DTYPE_NAMES) and "fp32" in names, f"{command} {option}: {action.choices}"
            assert action.default in (None, *action.choices), f"{command} {option}"
            assert "default" in action.help, f"{command} {option}: --help hides the default"


def test_device_and_batch_size_show_their_default_and_counts_are_positive():
    for command, _, action in ACTIONS:
        kind = getattr(action, SHARED, None)
        if kind in ("device", "batch-size", "seed", "solver"):
            assert "default" in action.help, f"{command}: --{kind} hides its default in --help"
        if kind == "batch-size":
            assert action.type is positive_int and action.default >= 1, command


def test_every_solver_option_takes_a_shared_table():
    solver_actions = [(command, action) for command, option, action in ACTIONS if option == "--solver"]
    assert {command for command, _ in solver_actions} >= {"dcae sample", "dcae t2i sample", "dcae t2i export"}
    for command, action in solver_actions:
        assert any(action.solvers is table for table in SOLVER_TABLES), f"{command}: {action.solvers}"
        assert [c for c in action.choices if c != "auto"] == list(action.solvers), command


def test_solver_tables_keep_what_each_command_accepted():
    """The tables as the commands accepted them before they were shared (order aside)."""
    assert set(SAMPLE_SOLVERS) == {"heun", "euler", "dpm++", "ddim", "ddpm", "dpm-solver", "dopri5", "heun2",
                                   "midpoint", "rk4"}  # fmt: skip
    assert set(FLOW_MODEL_SOLVERS) == {"euler", "heun", "dpm++", "ddim"}
    assert set(EXPORT_SOLVERS) == {"euler", "heun", "dpm++"}


@pytest.mark.parametrize(
    "argv",
    [
        ["encode", "x.png", "-o", "x.safetensors", "--model", "m", "--batch-size", "0"],
        ["eval", "--model", "m", "--data", "d", "--batch-size", "-2"],
        ["sample", "--ckpt", "c", "-o", "o", "--batch-size", "0"],
        ["sample", "--ckpt", "c", "-o", "o", "-n", "0"],
        ["t2i", "sample", "--ckpt", "c", "-o", "o", "--batch-size", "0"],
        ["latents", "--model", "m", "--data", "d", "-o", "o", "--batch-size", "0"],
    ],
)
def test_a_zero_or_negative_count_is_a_one_line_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "must be at least 1" in err and err.startswith("dcae ")


def test_shared_options_parse_as_before():
    args = build_parser().parse_args(["encode", "x.png", "-o", "x.safetensors", "--model", "m"])
    assert (args.device, args.dtype, args.batch_size, args.overwrite) == ("auto", "fp32", 4, False)
    args = build_parser().parse_args(["bench", "ae"])
    assert (args.device, args.dtype, args.seed) == (None, None, 0)
    args = build_parser().parse_args(["bench", "diffusion"])
    assert (args.device, args.dtype) == ("auto", "auto")
    args = build_parser().parse_args(["t2i", "export", "--ckpt", "c", "-o", "o"])
    assert args.solver == "euler"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sample", "--ckpt", "c", "-o", "o", "--dtype", "fp16"])  # as before: no fp16


def test_building_the_parsers_imports_no_torch():
    """`dcae --help` stays fast: no command module imports torch (or numpy) while the parsers are built."""
    import subprocess
    import sys

    code = ("import sys, dcae.cli; dcae.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'numpy') if m in sys.modules]; assert not heavy, heavy")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
