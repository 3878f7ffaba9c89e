"""The `dcae` command line: a thin layer over the library.

Each area registers its own subcommands (`register(subparsers)` in its `commands` module), so this
file only wires them together. Command modules import torch and friends lazily, inside the
handlers, so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dcae.errors import USER_ERROR_TYPES

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
    return parser


def _optional_import(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only a missing command module itself is tolerated; a broken import inside it is a bug.
        if exc.name == name:
            return None
        raise


def main(argv: list[str] | None = None) -> int:
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
