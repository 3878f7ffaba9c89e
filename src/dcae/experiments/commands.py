"""`dcae experiment NAME [--smoke] [--out DIR]`: the paper's findings reproduced at small scale."""

from __future__ import annotations

import argparse
import importlib

from dcae.experiments import EXPERIMENTS
from dcae.utils.cliargs import positive_int

EPILOG = """\
examples:
  dcae experiment residual                       # full protocol on ../shared/data/imagenet-samples
  dcae experiment gan --smoke --out /tmp/gan     # pipeline check on bundled photos, in seconds
  dcae experiment adaptation --data ~/photos     # another folder: sorted, the last 100 held out
  dcae experiment t2i --smoke                    # text-to-image on rendered scenes (makes its own data)
  dcae experiment adapt --smoke                  # DC-Gen: move the t2i teacher onto the f32 autoencoder
A killed experiment continues where it stopped when run again with the same --out.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="reproduce one of the paper's findings at small scale (residual, adaptation, gan, decoder, t2i, "
        "structured, adapt)",
        description="\n".join(f"{k}: {v[1]}" for k, v in EXPERIMENTS.items()),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=list(EXPERIMENTS))
    p.add_argument("--smoke", action="store_true", help="a few steps on bundled photos: checks the pipeline")
    p.add_argument("--out", help="output folder (default runs/experiments/NAME, or NAME-smoke with --smoke)")
    p.add_argument("--data", help="image folder (default ../shared/data/imagenet-samples)")
    p.add_argument("--seeds", type=positive_int, help="number of seeds (default 3, decoder 1, smoke 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dcae.experiments.common import make_protocol
    from dcae.utils.io import check_input, check_output_dir

    out = args.out or f"runs/experiments/{args.name}" + ("-smoke" if args.smoke else "")
    check_output_dir(out, "--out folder")
    if args.data:
        check_input(args.data, "--data folder")
    module = importlib.import_module(EXPERIMENTS[args.name][0])
    seeds = args.seeds or (None if args.smoke else getattr(module, "DEFAULT_SEEDS", None))
    protocol = make_protocol(args.name, out, args.data, args.smoke, seeds, getattr(module, "OWN_DATA", None))
    module.run(protocol)
    print(f"report: {protocol.out / 'report.md'}")
    return 0
