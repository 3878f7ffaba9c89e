"""Class-conditional (and unconditional) diffusion commands: `dcae latents` and `dcae sample`.

Handlers import torch and the diffusion modules lazily so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcae.errors import UserError
from dcae.utils.cliargs import (
    add_batch_size,
    add_device,
    add_dtype,
    add_output,
    add_overwrite,
    add_seed,
    add_solver,
    guidance_scale,
    nonnegative_int,
    number_type,
    positive_int,
    time_interval,
    with_checks,
    workers_int,
)
from dcae.utils.numbers import ETA
from dcae.utils.sizes import check_images_fit

RELEASED_RESOLUTION = 512  # every released model of `dcae sample --model` makes ImageNet 512 x 512 images


def _load_autoencoder(source: str):
    from dcae.models import DCAE

    return DCAE.from_pretrained(source)


# ----------------------------------------------------------------------------- dcae latents
def cmd_latents(args: argparse.Namespace) -> int:
    import torch

    from dcae.diffusion.c2i.latents import extract_latents, finalize_latents
    from dcae.utils.devices import process_group_from_env, resolve_dtype
    from dcae.utils.io import check_input, check_output_dir

    check_output_dir(args.output, "output folder (-o)")
    check_input(args.data, "--data folder")
    check_input(args.model, "--model", must_exist=False)  # may be a zoo name or Hub id
    if args.labels:
        check_input(args.labels, "--labels file")
    # One process, or one per GPU under `accelerate launch` / torchrun: each writes every n-th shard.
    rank, world, device = process_group_from_env(args.device)
    autoencoder = _load_autoencoder(args.model)
    if args.compile:
        from dcae.models.fast import compile_dcae

        compile_dcae(autoencoder)
    index = extract_latents(
        autoencoder,
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
        dtype=resolve_dtype(args.dtype),
        overwrite=args.overwrite,
        rank=rank,
        world_size=world,
    )
    if world > 1:
        torch.distributed.barrier()  # every shard is on disk before the first process checks them
        if rank != 0:
            return 0
        index = finalize_latents(args.output)
    classes = f"{index.num_classes} classes ({index.label_source})" if index.num_classes else "no labels"
    status = "complete" if index.complete else "INCOMPLETE (rerun to finish)"
    print(
        f"{index.num_images} images -> {len(index.shards)} shards of latents {list(index.latent_shape)} "
        f"x scaling {index.scaling_factor:.4g}, {classes}, {status}: {args.output}"
    )
    rms = index.latent_rms
    if rms is not None and not 0.5 < rms < 2.0:
        import sys

        print(
            f"dcae: warning: the scaled latents have RMS {rms:.3g}, far from 1: this autoencoder's scaling "
            f"factor does not suit its latents (about {index.scaling_factor / rms:.4g} would)",
            file=sys.stderr,
        )
    return 0


# ----------------------------------------------------------------------------- dcae sample
def cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from dcae.diffusion.cache import load_autoencoder, recorded_source
    from dcae.diffusion.generation import (
        SAMPLE_REPORTS,
        ImageSampler,
        condition_values,
        leading_channels,
        write_samples,
    )
    from dcae.diffusion.processes.sampling import sample
    from dcae.diffusion.train.checkpoint import conditioning_of, load_checkpoint
    from dcae.diffusion.train.samples import default_solver
    from dcae.utils.devices import process_group_from_env
    from dcae.utils.io import check_input, check_output_dir

    check_output_dir(args.output, "output folder (-o)")
    for what, path in (("--model", args.model), ("--autoencoder", args.autoencoder), ("--fid-ref", args.fid_ref)):
        if path:
            check_input(path, what, must_exist=False)  # names, Hub ids, or cached statistics' names
    if args.ckpt:
        check_input(args.ckpt, "--ckpt")
    if args.model:  # a released DC-AE ImageNet model (name, Hub id or folder)
        if args.ckpt:
            raise UserError("pass --ckpt (a checkpoint of ours) or --model (a released model), not both")
        from dcae.diffusion.c2i.released.commands import cmd_sample_released

        return cmd_sample_released(args)
    if not args.ckpt:
        raise UserError("pass --ckpt (a checkpoint or training run folder) or --model (a released model)")
    args.steps = args.steps or 50
    args.cfg = 1.5 if args.cfg is None else args.cfg
    # Under torchrun / `accelerate launch` process r samples the missing images i with i % n == r, on its own GPU.
    rank, world, device = process_group_from_env(args.device)
    model, process, meta = load_checkpoint(args.ckpt, use_ema=not args.no_ema, device=device)
    lat, conditioning = meta["latents"], conditioning_of(meta)
    check_sample_fits(args, lat.resolution)
    values = condition_values(conditioning, args.classes, args.n, lat)
    solver = default_solver(process, args.solver)
    source = args.autoencoder or lat.autoencoder
    ae = load_autoencoder(lat, args.autoencoder).to(device).eval()
    interval = tuple(float(v) for v in args.guidance_interval.split(","))

    def latents(noise, batch_values: list, seeds: list[int], generators):
        return sample(model, process, noise, conditioning.batch(batch_values, device), steps=args.steps,
                      solver=solver, cfg_scale=args.cfg, guidance_interval=interval, eta=args.eta,
                      generator=torch.Generator(device).manual_seed(seeds[0]))  # fmt: skip

    shape = leading_channels(lat.latent_shape or (model.in_channels, model.input_size, model.input_size), model,
                             args.channels, ae, meta["path"])  # fmt: skip
    scaling = lat.scaling_factor  # what the latents it learned were multiplied by, whatever --autoencoder says
    run = ImageSampler(latents, ae, scaling, shape, args.seed, device, args.dtype)
    out = Path(args.output)
    plan = {"checkpoint": recorded_source(meta["path"]), "step": meta["step"], "ema": not args.no_ema,
            "autoencoder": recorded_source(source), "solver": solver, "steps": args.steps, "cfg": args.cfg,
            "guidance_interval": list(interval), "eta": args.eta, "seed": args.seed, "dtype": args.dtype,
            "latent_shape": list(shape)}  # fmt: skip
    paths = write_samples(run.images, values, out, args.n, args.batch_size, args.overwrite, rank, world,
                          settings=plan, condition="class", stale=SAMPLE_REPORTS)  # fmt: skip
    if rank == 0:
        _sample_report(args, out, paths, values, meta, {"autoencoder": source, "solver": solver,
                                                         "guidance_interval": list(interval)}, device)  # fmt: skip
    return 0


def _sample_report(args, out: Path, paths: list[Path], labels: list, meta: dict, settings: dict, device) -> None:
    """grid.png, samples.json (settings, labels, class names) and, with --fid-ref, gFID."""
    from dcae.data.images import load_image, make_grid, save_image
    from dcae.diffusion.generation import compute_gfid
    from dcae.utils.io import atomic_write_json

    lat = meta["latents"]
    k = min(args.n, args.grid)
    if k:
        save_image(make_grid([load_image(p) for p in paths[:k]], nrow=min(8, k)), out / "grid.png")
    names = lat.class_names or []
    atomic_write_json(
        out / "samples.json",
        {
            "checkpoint": meta["path"],
            "step": meta["step"],
            "autoencoder": settings["autoencoder"],
            "ema": not args.no_ema,
            "solver": settings["solver"],
            "steps": args.steps,
            "cfg": args.cfg,
            "guidance_interval": settings["guidance_interval"],
            "seed": args.seed,
            "labels": labels,
            "class_names": [names[y] if y is not None and y < len(names) else None for y in labels],
        },
    )
    print(f"{args.n} samples in {out / 'images'}" + (f", grid {out / 'grid.png'}" if k else ""))
    if args.fid_ref:
        score = compute_gfid([str(p) for p in paths], args.fid_ref, device, resolution=lat.resolution)
        print(f"gFID {score:.3f} ({args.n} samples vs {args.fid_ref})")
        atomic_write_json(out / "fid.json", {"fid": score, "num_samples": args.n, "reference": args.fid_ref})


def _latents_fit(args: argparse.Namespace) -> None:
    """A batch of crops (twice with --flip) fits in memory, or one line before any work."""
    r, batch = args.resolution, args.batch_size * (2 if args.flip else 1)
    what = f"--resolution {r} with --batch-size {args.batch_size}" + (" and --flip" if args.flip else "")
    check_images_fit(r, r, batch, args.device, what, batch_option=None)


def check_sample_fits(args: argparse.Namespace, resolution: int) -> None:
    """A sampling batch of `resolution` x `resolution` images (at most -n) fits in memory, or one line. Run before
    any work for the released models (512 px); with --ckpt the resolution is the checkpoint's: call this once
    the checkpoint's record is read (lat.resolution), before sampling."""
    batch = min(args.batch_size, args.n)
    check_images_fit(resolution, resolution, batch, args.device, f"-n {args.n}")


def _sample_fits(args: argparse.Namespace) -> None:
    if args.model:
        check_sample_fits(args, RELEASED_RESOLUTION)


def register(sub: argparse._SubParsersAction) -> None:
    from dcae.diffusion.solvers import SAMPLE_SOLVERS

    p = sub.add_parser("latents", help="precompute scaled DC-AE latents of an image folder for diffusion training")
    p.add_argument("--model", required=True, help="autoencoder: zoo name, Hub id, local folder or weight file")
    p.add_argument("--data", required=True, help="image folder (class subfolders, nXXXXXXXX_<name> files, or flat)")
    add_output(p, "output folder (shards + index.json); reruns resume")
    p.add_argument("--resolution", type=positive_int, default=512,
                   help="ADM center-crop size (a multiple of the autoencoder's f)")  # fmt: skip
    p.add_argument("--flip", action="store_true", help="also store latents of the horizontally flipped crops")
    add_batch_size(p, 32, "images per encoder forward pass")
    p.add_argument("--shard-size", type=positive_int, default=1024, help="latents per shard file")
    p.add_argument("--labels", help="labels file: JSON {file: label} or lines '<file> <label>'")
    p.add_argument("--unconditional", action="store_true", help="store no labels")
    p.add_argument("--workers", type=workers_int, default=2, help="image decoding workers (0: in this process)")
    add_device(p)
    add_dtype(p, "encoder compute")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoder (GPU; pays off for big folders)")
    add_overwrite(p, "replace latents of a different earlier run")
    p.set_defaults(func=with_checks(cmd_latents, _latents_fit))

    p = sub.add_parser(
        "sample",
        help="sample images from a diffusion checkpoint (grid + single images, gFID)",
        description="Samples images/000000.png ... (reruns fill in missing ones). Several GPUs: torchrun "
        "--nproc_per_node N -m dcae.cli sample ... (each process takes every N-th image; the first writes "
        "the grid, samples.json and gFID).",
    )
    p.add_argument("--ckpt", help="checkpoint .pt or a training run folder (uses the latest)")
    p.add_argument(
        "--model",
        help="a released DC-AE ImageNet 512 model instead of --ckpt: name (see `dcae models`), Hub id or folder",
    )
    add_output(p, "output folder: images/, grid.png, samples.json")
    p.add_argument("-n", type=positive_int, default=8, help="number of samples")
    p.add_argument("--classes", help="comma-separated class indices or names, used in turn (default: all evenly)")
    p.add_argument("--cfg", type=guidance_scale,
                   help="classifier-free guidance scale, 0..100 (1 = off; default 1.5, released: its own)")  # fmt: skip
    p.add_argument("--guidance-interval", type=time_interval, default="0,1",
                   help="guide only for t in [LO,HI], 0 <= LO <= HI <= 1 (0 data, 1 noise)")  # fmt: skip
    p.add_argument(
        "--steps", type=positive_int, help="solver steps (default 50; released: its own, e.g. 250 DDPM steps)"
    )
    add_solver(
        p,
        SAMPLE_SOLVERS,
        what="auto: heun / dpm++ for our models, the released sampler for --model (ddpm, dpm-solver or dopri5); "
        "released models also take dpm++ and ddim (flow ones heun, euler, and heun2, midpoint, rk4 on --steps "
        "grid points)",
    )
    p.add_argument("--channels", type=positive_int,
                   help="DC-AE 1.5 (released, or trained with augmented.channels): generate the first N latent "
                   "channels only; the structured decoder decodes them")  # fmt: skip
    p.add_argument("--eta", type=number_type(ETA, "eta", "DDIM's eta"), default=0.0,
                   help="DDIM stochasticity, 0..1 (0: deterministic)")  # fmt: skip
    add_seed(p, "image i's noise is seeded by (seed, i)")
    add_batch_size(p, 16, "images per sampling batch")
    p.add_argument("--grid", type=nonnegative_int, default=64, help="images in grid.png (0: none)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--autoencoder", help="override the autoencoder recorded in the checkpoint")
    p.add_argument("--fid-ref", help="reference statistics .npz (mu, sigma) or image folder: also report gFID")
    add_device(p)
    add_dtype(p, "diffusion model compute", fp16=False)
    add_overwrite(p, "regenerate images that exist")
    p.set_defaults(func=with_checks(cmd_sample, _sample_fits))
