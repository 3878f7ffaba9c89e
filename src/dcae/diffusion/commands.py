"""Commands both kinds of diffusion model share: `dcae diffusion train` (also `dcae t2i train`) and
`dcae bench diffusion`. The class-conditional commands are dcae.diffusion.c2i.commands, the text-to-image ones
dcae.diffusion.t2i.commands.

Handlers import torch and the diffusion modules lazily so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcae.utils import numbers
from dcae.utils.cliargs import (
    IntermixedParser,
    add_device,
    add_dtype,
    add_output,
    nonnegative_int,
    number_type,
    positive_int,
)


# ----------------------------------------------------------------------------- dcae diffusion train
def cmd_train(args: argparse.Namespace) -> int:
    from dcae.diffusion.train.config import config_to_dict, load_config
    from dcae.diffusion.train.loop import train
    from dcae.utils.io import check_input, check_output_dir

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():  # no config file, only overrides
        config, overrides = None, [config, *overrides]
    if config is not None:
        check_input(config, "config file", must_exist=False)  # a missing one is named by load_config
    cfg = load_config(config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        return 0
    if args.plan:
        return _print_plan(cfg, args)
    check_output_dir(cfg.out_dir, "out_dir")
    check_input(cfg.data, "data folder")
    if cfg.resume not in ("auto", "none", ""):
        check_input(cfg.resume, "resume checkpoint")
    result = train(cfg, progress=not args.quiet)
    if result["checkpoint"]:
        print(f"step {result['step']}, loss {result['loss']:.4f}, checkpoint {result['checkpoint']}")
    return 0


def _print_plan(cfg, args: argparse.Namespace) -> int:
    """`--plan`: the memory plan of the config's model on its latent cache, without training."""
    import os

    from dcae.diffusion.train.data import open_cache
    from dcae.diffusion.train.loop import _model_args
    from dcae.diffusion.train.plan import memory_plan
    from dcae.runtime.memory import GiB
    from dcae.utils.io import check_input

    check_input(cfg.data, "data folder")
    ds = open_cache(cfg.data, seed=cfg.seed, use_flip=cfg.use_flip)
    world = args.processes or int(os.environ.get("WORLD_SIZE", "1"))
    memory = int(args.gpu_memory * GiB) if args.gpu_memory else None
    model_args = _model_args(cfg, ds)
    if cfg.finetune.pretrained:  # the pretrained model's network, from its config (no weights loaded)
        from dcae.diffusion.t2i.finetune import planned_model_args

        model_args = planned_model_args(cfg.finetune.pretrained, model_args["conditioning"])
    print(memory_plan(cfg, model_args, ds.latent_shape, ds.conditioning, world, memory).describe())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diffusion", help="latent diffusion models on DC-AE latents")
    dsub = p.add_subparsers(dest="diffusion_command", metavar="WHAT")
    t = dsub.add_parser(
        "train",
        help="train a DiT / U-ViT on a latent folder (resumes automatically)",
        description="dcae diffusion train CONFIG.yaml [key=value ...] [--quiet] (options and overrides in any order)",
    )
    add_train_arguments(t, "YAML config (see configs/diffusion_*.yaml)")
    add_consolidate(dsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


# ----------------------------------------------------------------------------- dcae diffusion consolidate
def cmd_consolidate(args: argparse.Namespace) -> int:
    from dcae.diffusion.train.checkpoint import latest_checkpoint
    from dcae.errors import UserError
    from dcae.runtime import sharding

    folder = latest_checkpoint(args.ckpt)
    if not sharding.is_checkpoint(folder):
        raise UserError(f"{folder} is not a sharded checkpoint folder (parallel.strategy=fsdp writes those)")
    out = Path(args.output)
    sharding.consolidate(folder, out, optimizer=not args.weights_only)
    print(f"{folder} -> {out}")
    return 0


def add_consolidate(sub: argparse._SubParsersAction) -> None:
    """`consolidate`: a sharded checkpoint (FSDP run) -> one ordinary checkpoint file, read on the CPU."""
    c = sub.add_parser(
        "consolidate",
        help="a sharded checkpoint folder (parallel.strategy=fsdp) -> one ordinary .pt checkpoint, on the CPU",
        description="Sampling and export read sharded checkpoints directly; this writes the file once (e.g. to "
        "copy it elsewhere, or to resume under DDP).",
    )
    c.add_argument("ckpt", help="checkpoint folder checkpoints/step_XXXXXXX, or a run folder (its newest)")
    add_output(c, "the consolidated checkpoint file (e.g. RUN/step_XXXXXXX.pt, beside checkpoints/)")
    c.add_argument("--weights-only", action="store_true",
                   help="leave out the optimizer (half the size): samples and exports, does not resume")  # fmt: skip
    c.set_defaults(func=cmd_consolidate)


def add_train_arguments(t: argparse.ArgumentParser, config_help: str) -> None:
    """The arguments of the diffusion trainer's commands (`dcae diffusion train`, `dcae t2i train`)."""
    t.__class__ = IntermixedParser
    t.add_argument("config", nargs="?", help=config_help)
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-4 max_steps=1000")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument(
        "--plan",
        action="store_true",
        help="print the memory plan per process (weights, gradients, AdamW, EMA, activations) and exit",
    )
    t.add_argument(
        "--processes",
        type=positive_int,
        help="--plan: the number of processes (default: the launcher's WORLD_SIZE, else 1)",
    )
    t.add_argument("--gpu-memory", type=number_type(numbers.POSITIVE, "gpu_memory", "GiB"),
                   help="--plan: GiB of memory per GPU to check against (default: this machine's GPU)")  # fmt: skip
    t.set_defaults(func=cmd_train)


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        nargs="+",
        help="model families, e.g. DiT-S UViT-S, or text-to-image SANA-tiny SANA-600M SANA-1600M (default: DiT-S "
        "on CPU, DiT-XL and UViT-H on GPU); the patch size follows the setting",
    )
    p.add_argument(
        "--resolution",
        nargs="+",
        type=positive_int,
        default=[512],
        choices=[512, 1024],
        help="image sizes in px; the latent sides scale with it, ratios are per resolution",
    )
    p.add_argument("--batch", type=positive_int, help="images per step (default: 2 on CPU, 32 on GPU)")
    add_device(p)
    add_dtype(p, "compute", default="auto", fp16=False, auto="bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU)")
    p.add_argument("--warmup", type=nonnegative_int, help="untimed steps (default 1 CPU, 3 GPU)")
    p.add_argument("--steps", type=positive_int, help="timed steps, median reported (default 3 CPU, 10 GPU)")
    p.add_argument(
        "--depth", type=positive_int, help="override the depth (SANA: layers) of the named model (smaller CPU runs)"
    )
    p.add_argument("--text-tokens", type=positive_int, help="text-to-image models: prompt tokens (default SANA's 300)")
    p.add_argument(
        "--caption-channels",
        type=positive_int,
        help="text-to-image models: prompt embedding width (default Gemma-2's 2304)",
    )
    p.add_argument(
        "--sample-steps",
        type=nonnegative_int,
        metavar="N",
        help="also time sampling: N flow steps with classifier-free guidance (doubled batch) "
        "(default: 0; with a text-to-image model 20 on GPU, 2 on CPU)",
    )
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    p.add_argument(
        "--generate-steps",
        type=nonnegative_int,
        default=0,
        metavar="N",
        help="also whole-image generation: N CFG sampling steps + the autoencoder's 512 px decode",
    )
    p.add_argument("--json", help="write the records to this JSON file")


def cmd_bench(args: argparse.Namespace) -> int:
    from dcae.diffusion.bench import main_from_args
    from dcae.utils.io import check_output_file

    if args.json:  # and the chart next to it
        check_output_file(args.json, overwrite=True, what="--json file")
        check_output_file(Path(args.json).with_suffix(".png"), overwrite=True, what="chart")
    return main_from_args(args)


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diffusion",
        help="DiT/U-ViT/SANA training, inference and sampling throughput on f8-p2, f32-p1 and f64-p1 latents "
        "(512 or 1024 px)",
    )
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
