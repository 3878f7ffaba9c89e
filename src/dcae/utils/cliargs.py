"""Command-line parsing shared by the commands: the options many commands take, each defined once here
(`add_device`, `add_dtype`, `add_batch_size`, `add_output`, `add_overwrite`, `add_seed`, `add_solver`), the
`positive_int` type of count options, and `IntermixedParser` for a config plus `key=value` overrides.

Every action these functions create carries `SHARED` (the option's kind: "device", "dtype", ...), so a test can
check that no command defines one of these options by hand. Options with a value show their default in --help.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# The command line's device and dtype names (dcae.utils.devices resolves them); no torch here, so that building
# the parsers stays fast.
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the --dtype choices
AUTO_DEVICE = "cuda when available, else cpu"  # what resolve_device("auto") picks
DEVICE_EXAMPLES = "cpu, cuda, cuda:1, mps"  # other device names, as torch spells them

SHARED = "dcae_shared_option"  # attribute of the actions made here: the option's kind


def positive_int(text: str) -> int:
    """argparse type of count options (batch sizes, numbers of samples, steps): 0 or less is a usage error."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _shared(action: argparse.Action, kind: str) -> argparse.Action:
    setattr(action, SHARED, kind)
    return action


def add_device(p: argparse.ArgumentParser, default: str | None = "auto") -> argparse.Action:
    """`--device`, resolved by dcae.utils.devices.resolve_device. default=None: the command picks (AUTO_DEVICE)
    and does not take "auto" itself."""
    if default is None:
        text = f"{DEVICE_EXAMPLES} (default: {AUTO_DEVICE})"
    else:
        text = f"auto ({AUTO_DEVICE}), {DEVICE_EXAMPLES} (default: %(default)s)"
    return _shared(p.add_argument("--device", default=default, help=text), "device")


def add_dtype(
    p: argparse.ArgumentParser,
    what: str = "compute",
    *,
    default: str | None = "fp32",
    fp16: bool = True,
    auto: str | None = None,
    flag: str = "--dtype",
) -> argparse.Action:
    """`--dtype` (or another `flag`, e.g. --text-dtype): a name of dcae.utils.devices.DTYPES, for `what` (the
    autoencoder, the text encoder, ...). fp16=False leaves fp16 out. `auto` says what the command picks by
    itself: with default="auto" "auto" becomes a choice, with default=None it is what an omitted option means."""
    choices = tuple(name for name in DTYPE_NAMES if fp16 or name != "fp16")
    if default == "auto":
        choices = ("auto", *choices)
        text = f"{what} dtype; auto: {auto} (default: %(default)s)"
    elif default is None:
        text = f"{what} dtype (default: {auto})"
    else:
        text = f"{what} dtype (default: %(default)s)"
    if default is not None and default not in choices:
        raise ValueError(f"{flag} default {default!r} is not one of {choices}")
    return _shared(p.add_argument(flag, default=default, choices=choices, help=text), "dtype")


def add_batch_size(p: argparse.ArgumentParser, default: int, what: str = "images per forward pass") -> argparse.Action:
    """`--batch-size`: a positive count of `what`."""
    action = p.add_argument("--batch-size", type=positive_int, default=default, help=f"{what} (default: %(default)s)")
    return _shared(action, "batch-size")


def add_output(p: argparse.ArgumentParser, what: str) -> argparse.Action:
    """`-o/--output` (required): the file or folder a command writes, described by `what`."""
    return _shared(p.add_argument("-o", "--output", required=True, help=what), "output")


def add_overwrite(p: argparse.ArgumentParser, what: str = "replace existing output") -> argparse.Action:
    """`--overwrite`: a flag, off by default."""
    return _shared(p.add_argument("--overwrite", action="store_true", help=what), "overwrite")


def add_seed(p: argparse.ArgumentParser, what: str = "random seed", default: int = 0) -> argparse.Action:
    """`--seed`: an integer seed."""
    return _shared(p.add_argument("--seed", type=int, default=default, help=f"{what} (default: %(default)s)"), "seed")


def add_solver(
    p: argparse.ArgumentParser, solvers: Sequence[str], *, default: str = "auto", what: str | None = None
) -> argparse.Action:
    """`--solver`: one of `solvers`, a table of the module that runs them (dcae.diffusion.processes.sampling
    and friends); default="auto" adds "auto" (the command picks, as `what` says). The action keeps the table
    as `.solvers`."""
    choices = ("auto", *solvers) if default == "auto" else tuple(solvers)
    if default not in choices:
        raise ValueError(f"--solver default {default!r} is not one of {choices}")
    text = f"{what} (default: %(default)s)" if what else "default: %(default)s"
    action = p.add_argument("--solver", default=default, choices=choices, help=text)
    action.solvers = solvers
    return _shared(action, "solver")


class IntermixedParser(argparse.ArgumentParser):
    """Lets `key=value` overrides and options come in any order (`CONFIG --phase 2 a=b c=d`).

    A sub-parser made by `add_parser` becomes one with `parser.__class__ = IntermixedParser`."""

    _busy = False

    def parse_known_args(self, args=None, namespace=None):
        if self._busy:  # parse_known_intermixed_args calls back into parse_known_args
            return super().parse_known_args(args, namespace)
        self._busy = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._busy = False
