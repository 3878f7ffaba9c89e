"""`dcae sample --model RELEASED`: class labels -> decoded ImageNet samples with a released diffusion model.

Everything is checked before the first file is written (model name, weights, classes, channels, the
autoencoder), so bad input leaves no output behind. Image i's noise is seeded by i (and DDPM's per-step
noise by a per-image generator), so the batch size, the number of processes and reruns that fill in
missing images do not change image i.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dcae.data.images import load_image, make_grid, save_image
from dcae.diffusion.c2i.released.models import load_released
from dcae.diffusion.c2i.released.sampling import check_inputs, default_steps, generate, samplers_for
from dcae.diffusion.cache import recorded_source
from dcae.diffusion.generation import (
    SAMPLE_REPORTS,
    ImageSampler,
    compute_gfid,
    condition_values,
    write_samples,
)
from dcae.errors import UserError
from dcae.models import DCAE
from dcae.utils.devices import process_group_from_env
from dcae.utils.io import atomic_write_json


def cmd_sample_released(args: argparse.Namespace) -> int:

    if tuple(float(v) for v in args.guidance_interval.split(",")) != (0.0, 1.0):
        raise UserError("--guidance-interval does not apply to the released models (none was evaluated with one)")
    rank, world, device = process_group_from_env(args.device)
    model = load_released(args.model, device=device)
    release = model.release
    labels = condition_values(model.diffusion_model.conditioning, args.classes, args.n, {})
    solver = release.spec.sampler if args.solver == "auto" else args.solver
    if solver not in samplers_for(model):
        raise UserError(f"--solver {solver} does not fit {release.name}; use {', '.join(samplers_for(model))}")
    size = model.diffusion_model.input_size
    channels = args.channels or model.in_channels
    check_inputs(model, torch.tensor(labels[:1]), torch.zeros(1, channels, size, size))
    source = args.autoencoder or release.autoencoder  # zoo name (DC-Gen's names are zoo aliases)
    ae = DCAE.from_pretrained(source).to(device).eval()
    settings = {
        "model": release.name, "source": str(args.model), "family": release.family, "autoencoder": source,
        "scaling_factor": release.scaling_factor, "solver": solver, "steps": args.steps or default_steps(model, solver),
        "cfg": release.cfg_scale if args.cfg is None else args.cfg, "channels": channels, "seed": args.seed,
        "resolution": size * ae.spatial_compression,
    }  # fmt: skip
    shape = (channels, size, size)

    def latents(noise, batch_labels: list[int], seeds: list[int], generators):
        def step_noise(k: int) -> torch.Tensor:  # DDPM: one draw per image and step from the image's generator
            draw = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
            return torch.cat([draw, draw]) if settings["cfg"] != 1.0 else draw  # the second half is never used

        y = torch.tensor(batch_labels, device=device)
        z, _ = generate(model, y, noise, cfg_scale=settings["cfg"], sampler=solver, steps=settings["steps"],
                        step_noise=step_noise)  # fmt: skip
        return z

    run = ImageSampler(latents, ae, release.scaling_factor, shape, args.seed, device, args.dtype)
    out = Path(args.output)
    plan = {
        **settings,
        "source": recorded_source(args.model),
        "autoencoder": recorded_source(source),
        "dtype": args.dtype,
    }
    paths = write_samples(run.images, labels, out, args.n, args.batch_size, args.overwrite, rank, world,
                          desc=f"sampling ({solver})", settings=plan, condition="class",
                          stale=SAMPLE_REPORTS)  # fmt: skip
    if rank == 0:
        _report(args, out, paths, labels, settings, device)
    return 0


def _report(args, out: Path, paths: list[Path], labels: list[int], settings: dict, device) -> None:

    k = min(args.n, args.grid)
    if k:
        save_image(make_grid([load_image(p) for p in paths[:k]], nrow=min(8, k)), out / "grid.png")
    atomic_write_json(out / "samples.json", {**settings, "labels": labels})
    print(f"{args.n} samples of {settings['model']} in {out / 'images'}" + (f", grid {out / 'grid.png'}" if k else ""))
    if args.fid_ref:
        score = compute_gfid([str(p) for p in paths], args.fid_ref, device, resolution=settings["resolution"])
        print(f"gFID {score:.3f} ({args.n} samples vs {args.fid_ref})")
        atomic_write_json(out / "fid.json", {"fid": score, "num_samples": args.n, "reference": args.fid_ref})
