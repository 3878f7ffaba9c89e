"""The `dcae` command line: a thin layer over the library.

Each area registers its own subcommands (`register(subparsers)` in its `commands` module), so this
file only wires them together. Command modules import torch and friends lazily, inside the
handlers, so that `dcae --help` stays fast. Every parser shows its options' defaults in --help
(cliargs.show_defaults); a command's errors are one `dcae: error:` line, its warnings one `dcae: warning:` line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import warnings
from collections.abc import Iterator

from dcae.errors import USER_ERROR_TYPES
from dcae.utils.cliargs import show_defaults

# (module, function) pairs that add subcommands to the top-level parser.
COMMAND_MODULES = [
    "dcae.models.commands",  # models, encode, decode, reconstruct, convert, demo
    "dcae.metrics.commands",  # eval, fid, metrics
    "dcae.train.commands",  # train
    "dcae.diffusion.c2i.commands",  # latents, sample
    "dcae.diffusion.commands",  # diffusion train
    "dcae.diffusion.t2i.commands",  # t2i cache | train | sample | export | eval
    "dcae.experiments.commands",  # experiment
]
# Modules that add `dcae bench <what>` subcommands.
BENCH_MODULES = ["dcae.models.bench", "dcae.diffusion.commands"]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcae", description="Deep Compression Autoencoders: encode, decode, train, evaluate, diffuse."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        module = _optional_import(name)
        if module is not None and hasattr(module, "register"):
            module.register(sub)
    bench = sub.add_parser("bench", help="throughput benchmarks against diffusers")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="WHAT")
    for name in BENCH_MODULES:
        module = _optional_import(name)
        if module is not None and hasattr(module, "register_bench"):
            module.register_bench(bench_sub)
    return show_defaults(parser)


def _optional_import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only a missing command module itself is tolerated; a broken import inside it is a bug.
        if exc.name == name:
            return None
        raise


def format_warning(message, category, filename=None, lineno=None, line=None) -> str:
    """A warning as the command line prints it: `dcae: warning: <message>`, one line, without the source line
    Python shows. The category is named only for warnings that are not plain messages to the user (e.g.
    `DeprecationWarning: ...` from a library); dcae's own categories and UserWarning are not."""
    text = " ".join(str(message).split())  # one line
    plain = category is UserWarning or category.__module__.split(".")[0] == "dcae"
    return f"dcae: warning: {text if plain else f'{category.__name__}: {text}'}\n"


@contextlib.contextmanager
def one_line_warnings() -> Iterator[None]:
    """Within: every warning shown is printed by `format_warning` (to stderr); the previous functions after."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        stream = sys.stderr if file is None else file
        with contextlib.suppress(OSError):  # stderr gone: nothing to tell
            stream.write(format_warning(message, category, filename, lineno, line))

    saved = warnings.showwarning, warnings.formatwarning
    warnings.showwarning, warnings.formatwarning = show, format_warning
    try:
        yield
    finally:
        warnings.showwarning, warnings.formatwarning = saved


def main(argv: list[str] | None = None) -> int:
    with one_line_warnings():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # known, user-facing errors print one line
        if isinstance(exc, (*USER_ERROR_TYPES, CLIError)):
            print(f"dcae: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
