"""Diffusion commands: `dcae latents`, `dcae diffusion train`, `dcae sample`, `dcae bench diffusion`.

Handlers import torch and the diffusion modules lazily so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _load_autoencoder(source: str):
    from dcae.models import DCAE

    return DCAE.from_pretrained(source)


# ----------------------------------------------------------------------------- dcae latents
def cmd_latents(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from dcae.diffusion.latents import extract_latents

    state = PartialState()  # one process, or one per GPU under `accelerate launch` / torchrun
    device = state.device if args.device == "auto" else _device(args.device)
    index = extract_latents(
        _load_autoencoder(args.model),
        args.data,
        args.output,
        model_name=args.model,
        resolution=args.resolution,
        flip=args.flip,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        labels_file=args.labels,
        unconditional=args.unconditional,
        num_workers=args.workers,
        device=device,
        dtype=_dtype(args.dtype),
        overwrite=args.overwrite,
        rank=state.process_index,
        world_size=state.num_processes,
    )
    if state.is_main_process:
        classes = f"{index['num_classes']} classes ({index['label_source']})" if index["num_classes"] else "no labels"
        status = "complete" if index["complete"] else "incomplete (other processes still writing)"
        print(
            f"{index['num_images']} images -> {len(index['shards'])} shards of latents {index['latent_shape']} "
            f"x scaling {index['scaling_factor']:.4g}, {classes}, {status}: {args.output}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latents", help="precompute scaled DC-AE latents of an image folder for diffusion training")
    p.add_argument("--model", required=True, help="autoencoder: zoo name, Hub id, local folder or weight file")
    p.add_argument("--data", required=True, help="image folder (class subfolders, nXXXXXXXX_<name> files, or flat)")
    p.add_argument("-o", "--output", required=True, help="output folder (shards + index.json); reruns resume")
    p.add_argument("--resolution", type=int, default=512, help="ADM center-crop size (default 512)")
    p.add_argument("--flip", action="store_true", help="also store latents of the horizontally flipped crops")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=1024, help="latents per shard file (default 1024)")
    p.add_argument("--labels", help="labels file: JSON {file: label} or lines '<file> <label>'")
    p.add_argument("--unconditional", action="store_true", help="store no labels")
    p.add_argument("--workers", type=int, default=2, help="image decoding workers (default 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="encoder compute dtype")
    p.add_argument("--overwrite", action="store_true", help="replace latents of a different earlier run")
    p.set_defaults(func=cmd_latents)


def register_bench(sub: argparse._SubParsersAction) -> None:
    pass


_ = Path  # used by later commands
