"""`dcae sample --model RELEASED`: class labels -> decoded ImageNet samples with a released diffusion model.

Everything is checked before the first file is written (model name, weights, classes, channels, the
autoencoder), so bad input leaves no output behind. Image i's noise is seeded by i (and DDPM's per-step
noise by a per-image generator), so the batch size, the number of processes and reruns that fill in
missing images do not change image i.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_sample_released(args: argparse.Namespace) -> int:
    import torch

    from dcae.diffusion.generation import sample_labels, write_samples
    from dcae.diffusion.released import load_released
    from dcae.diffusion.released_sampling import check_inputs, default_steps, samplers_for
    from dcae.errors import UserError
    from dcae.models import DCAE
    from dcae.utils.runtime import process_group_from_env

    if tuple(float(v) for v in args.guidance_interval.split(",")) != (0.0, 1.0):
        raise UserError("--guidance-interval does not apply to the released models (none was evaluated with one)")
    rank, world, device = process_group_from_env(args.device)
    model = load_released(args.model, device=device)
    release = model.release
    labels = sample_labels(args.classes, args.n, {}, model.num_classes)
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
    run = _ReleasedSampler(model, ae, settings, (channels, size, size), device, args.dtype)

    out = Path(args.output)
    paths = write_samples(run.images, labels, out, args.n, args.batch_size, args.overwrite, rank, world,
                          desc=f"sampling ({solver})")  # fmt: skip
    if rank == 0:
        _report(args, out, paths, labels, settings, device)
    return 0


class _ReleasedSampler:
    def __init__(self, model, ae, settings: dict, shape: tuple, device, dtype: str) -> None:
        self.model, self.ae, self.s, self.shape, self.device, self.dtype = model, ae, settings, shape, device, dtype

    def images(self, idx: list[int], labels: list[int]):
        import torch

        from dcae.diffusion.released_sampling import generate
        from dcae.errors import NonFiniteError

        gens = [torch.Generator().manual_seed(self.s["seed"] * 1_000_003 + i) for i in idx]
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self.device)
        y = torch.tensor([labels[i] for i in idx], device=self.device)

        def step_noise(k: int) -> torch.Tensor:  # DDPM: one draw per image and step from the image's generator
            draw = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self.device)
            return torch.cat([draw, draw]) if self.s["cfg"] != 1.0 else draw  # the second half is never used

        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")
        with torch.no_grad(), autocast:
            z, _ = generate(self.model, y, noise, cfg_scale=self.s["cfg"], sampler=self.s["solver"],
                            steps=self.s["steps"], step_noise=step_noise)  # fmt: skip
        if not torch.isfinite(z).all():
            raise NonFiniteError("sampling produced NaN/Inf latents")
        with torch.no_grad():
            return self.ae.decode(z.float() / self.s["scaling_factor"]).float()


def _report(args, out: Path, paths: list[Path], labels: list[int], settings: dict, device) -> None:
    from dcae.data.images import load_image, make_grid, save_image
    from dcae.diffusion.generation import compute_gfid
    from dcae.utils.io import atomic_write_json

    k = min(args.n, args.grid)
    if k:
        save_image(make_grid([load_image(p) for p in paths[:k]], nrow=min(8, k)), out / "grid.png")
    atomic_write_json(out / "samples.json", {**settings, "labels": labels})
    print(f"{args.n} samples of {settings['model']} in {out / 'images'}" + (f", grid {out / 'grid.png'}" if k else ""))
    if args.fid_ref:
        score = compute_gfid([str(p) for p in paths], args.fid_ref, device, resolution=settings["resolution"])
        print(f"gFID {score:.3f} ({args.n} samples vs {args.fid_ref})")
        atomic_write_json(out / "fid.json", {"fid": score, "num_samples": args.n, "reference": args.fid_ref})
