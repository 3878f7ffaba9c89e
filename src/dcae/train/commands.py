"""`dcae train`: training and fine-tuning with decoupled high-resolution adaptation."""

from __future__ import annotations

import argparse

from dcae.utils.cliargs import IntermixedParser

EPILOG = """\
examples:
  dcae train tiny --out runs/tiny                      # packaged CPU-sized config, all three phases
  dcae train configs/train_f32c32.yaml data.train=[/data/imagenet/train] --phase 1
  dcae train configs/train_finetune.yaml --init mit-han-lab/dc-ae-f32c32-in-1.0 data.train=[my_photos]
  dcae train decoder_lite --init mit-han-lab/dc-ae-f32c32-sana-1.1 data.train=[my_photos]  # new decoder,
                                                       # frozen encoder (also decoder_tiny: ~1M preview)
  dcae train CONFIG.yaml --resume --out runs/x         # continue a killed run exactly where it stopped
  accelerate launch -m dcae.cli train CONFIG.yaml      # multi-GPU / multi-node (also torchrun -m)
overrides are dotted keys: phase2.resolution=1024 phase2.trainable_inner_stages=true loss weights:
  phase3.loss.gan_weight=0.5 phase1.loss.perceptual_weight=0.25 (see docs/training.md)
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train or fine-tune a DC-AE (3 phases: low-res full, high-res latent adaptation, head refinement)",
        description=(
            "Train or fine-tune a DC-AE with the paper's decoupled high-resolution adaptation: phase 1 "
            "low-resolution full training (L1 + LPIPS), phase 2 high-resolution latent adaptation (only the "
            "layers next to the latent), phase 3 low-resolution head refinement (decoder head, + GAN)."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.__class__ = IntermixedParser
    p.add_argument(
        "config", help="training config YAML, or a packaged one: tiny, f32c32, finetune, decoder_lite, decoder_tiny"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. phase1.steps=100")
    p.add_argument("--phase", default="all", choices=["1", "2", "3", "all"], help="which phase(s) to run")
    p.add_argument(
        "--init", help="start from these weights (folder, file or Hub id): fine-tuning; the teacher in decoder_*"
    )
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoints in the output folder")
    p.add_argument("--out", help="output folder (default: out_dir of the config)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dcae.runtime.config import dump_yaml
    from dcae.train.config import load_config
    from dcae.utils.io import check_input, check_output_dir

    check_input(args.config, "config", must_exist=False)  # may be a packaged name
    cfg = load_config(args.config, list(args.overrides))
    if args.out:
        cfg.out_dir = args.out
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    check_output_dir(cfg.out_dir, "--out folder" if args.out else "out_dir")
    for source in [*cfg.data.train, *(cfg.data.val or [])]:
        check_input(source, "data", must_exist=False)  # folders, files, .tar shards or globs
    for what, path in (("--init", args.init), ("model.init", cfg.model.init)):
        if path:
            check_input(path, what, must_exist=False)  # may be a Hub id
    from dcae.train.trainer import train

    phases = [1, 2, 3] if args.phase == "all" else [int(args.phase)]
    result = train(cfg, phases=phases, init=args.init, resume=args.resume)
    if result["model"] is not None:
        print(f"trained model: {result['model']}")
    return 0
