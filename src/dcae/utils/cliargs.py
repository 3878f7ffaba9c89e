"""Command-line parsing shared by the commands: the options many commands take, each defined once here
(`add_device`, `add_dtype`, `add_batch_size`, `add_output`, `add_overwrite`, `add_seed`, `add_solver`), the types
of numeric options by meaning (`positive_int` for counts, `nonnegative_int`, `positive_float`, `probability`,
`guidance_scale`, ...: dcae.utils.numbers says what each kind of number may be, for the trainers' configs too),
`IntermixedParser` for a config plus `key=value` overrides, and the help formatter that shows every option's
default (`show_defaults`, applied to the whole `dcae` parser by dcae.cli).

Every action these functions create carries `SHARED` (the option's kind: "device", "dtype", ...), so a test can
check that no command defines one of these options by hand. Options with a value show their default in --help.
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable, Sequence

from dcae.utils import numbers
from dcae.utils.numbers import Kind

# The command line's device and dtype names (dcae.utils.devices resolves them); no torch here, so that building
# the parsers stays fast.
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # the --dtype choices
AUTO_DEVICE = "cuda when available, else cpu"  # what resolve_device("auto") picks
DEVICE_EXAMPLES = "cpu, cuda, cuda:1, mps"  # other device names, as torch spells them

SHARED = "dcae_shared_option"  # attribute of the actions made here: the option's kind


# ----------------------------------------------------------------------------- numbers by meaning
def _parse_number(text: str, integer: bool) -> int | float:
    """`text` as an int (integer kinds: also "1e3") or a float; nan, inf and 1.5 for an integer come back as
    floats for the kind to name what is wrong."""
    text = text.strip()
    try:
        return int(text) if integer else float(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        what = "a whole number" if integer else "a number"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    exact = math.isfinite(value) and value.is_integer() and abs(value) < 2**53  # 1e40 stays 1e+40 in messages
    return int(value) if integer and exact else value


def number_type(kind: Kind, name: str, what: str) -> Callable[[str], int | float]:
    """The argparse type of options whose values are numbers of `kind`: anything else (NaN, inf, out of range,
    a fraction for a count) is one usage line, `argument --x: must be ..., got ...` (exit status 2)."""

    def parse(text: str) -> int | float:
        value = _parse_number(text, kind.integer)
        problem = kind.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.__name__ = parse.__qualname__ = name
    parse.__doc__ = f"argparse type of {what}: {kind}."
    parse.kind = kind
    return parse


positive_int = number_type(numbers.COUNT, "positive_int", "counts (batch sizes, numbers of samples, steps)")
nonnegative_int = number_type(numbers.NONNEGATIVE_INT, "nonnegative_int", "counts where 0 means none")
seed_int = number_type(numbers.SEED, "seed_int", "seeds (0 .. 2^32-1)")
workers_int = number_type(numbers.WORKERS, "workers_int", "worker processes (0: none)")
finite_float = number_type(numbers.FINITE, "finite_float", "any finite number")
positive_float = number_type(numbers.POSITIVE, "positive_float", "finite numbers > 0")
nonnegative_float = number_type(numbers.NONNEGATIVE, "nonnegative_float", "finite numbers >= 0")
probability = number_type(numbers.PROBABILITY, "probability", "probabilities and shares in [0, 1]")
guidance_scale = number_type(numbers.GUIDANCE, "guidance_scale", "classifier-free guidance scales")
flow_shift = number_type(numbers.SHIFT, "flow_shift", "flow shifts of the time grid")


def image_size(text: str) -> str:
    """argparse type of --size HEIGHTxWIDTH (pixels, each a count): the text itself once it is valid, so that
    what the handlers and their records read is unchanged."""
    parts = text.strip().lower().split("x")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"give HEIGHTxWIDTH in pixels, e.g. 512x768, got {text!r}")
    for side, part in zip(("height", "width"), parts):
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"give HEIGHTxWIDTH in pixels, e.g. 512x768, got {text!r}") from None
        problem = numbers.COUNT.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{side} {problem} (in {text!r})")
    return text


def size_of(text: str) -> tuple[int, int]:
    """(height, width) of an --size text that `image_size` accepted."""
    h, w = (int(v) for v in text.strip().lower().split("x"))
    return h, w


def time_interval(text: str) -> str:
    """argparse type of an interval of normalized time `LO,HI` with 0 <= LO <= HI <= 1 (0 data, 1 noise): the text
    itself once it is valid (the handlers split it)."""
    parts = text.split(",")
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"give LO,HI with 0 <= LO <= HI <= 1, e.g. 0.1,0.9, got {text!r}")
    values = []
    for end, part in zip(("LO", "HI"), parts):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"give LO,HI with 0 <= LO <= HI <= 1, got {text!r}") from None
        problem = numbers.PROBABILITY.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(f"{end} {problem} (in {text!r})")
        values.append(value)
    if values[0] > values[1]:
        raise argparse.ArgumentTypeError(f"LO must not exceed HI, got {text!r}")
    return text


def with_checks(handler: Callable, *checks: Callable[[argparse.Namespace], None]) -> Callable:
    """`handler`, after `checks(args)` (each raises a one-line UserError): what a command refuses from its
    arguments alone, before the handler does any work (loads a model, opens an output)."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace):
        for check in checks:
            check(args)
        return handler(args)

    return run


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
    action = p.add_argument("--seed", type=seed_int, default=default, help=f"{what} (default: %(default)s)")
    return _shared(action, "seed")


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


# ----------------------------------------------------------------------------- --help
def _shows_default(action: argparse.Action, text: str) -> bool:
    """Whether --help should add " (default: X)" to `action`'s help: it has a value (not a flag, not None, not a
    sub-command), and its help text does not already say what the default is."""
    if action.help is argparse.SUPPRESS or action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
        return False
    if isinstance(action, argparse._SubParsersAction) or not (action.option_strings or action.nargs in ("?", "*")):
        return False
    return "%(default)" not in text and "default" not in text.lower()


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, without its doubles: " (default: X)" after the help of every
    option with a value, unless the help text already names the default; flags and options without a default
    (None: the command picks, as the help says) get none. A list shows as its items (`512 1024`)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action, text):
            return text
        if isinstance(action.default, (list, tuple)):
            shown = " ".join(str(v) for v in action.default).replace("%", "%%")
            return f"{text} (default: {shown})"
        return f"{text} (default: %(default)s)"


class RawDescriptionDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """DefaultsHelpFormatter that keeps the description's own line breaks (commands with examples)."""


def show_defaults(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give `parser` and every sub-command below it the formatter that shows defaults (keeping a raw
    description's layout where a parser asked for one)."""
    raw = issubclass(parser.formatter_class, argparse.RawDescriptionHelpFormatter)
    parser.formatter_class = RawDescriptionDefaultsHelpFormatter if raw else DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                show_defaults(sub)
    return parser
