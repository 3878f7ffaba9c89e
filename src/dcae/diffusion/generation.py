"""What `dcae sample` shares between our own diffusion checkpoints and the released models: the condition of
each image (balanced over all classes unless given, as FID protocols sample), seeded and decoded samples
written to disk, and the gFID of the result."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcae.data.images import save_image
from dcae.diffusion.cache import decode_scaled
from dcae.diffusion.conditioning import Conditioning
from dcae.errors import NonFiniteError, UserError
from dcae.metrics.accumulate import dataset_stats
from dcae.metrics.data import collect_images
from dcae.metrics.fid import GaussianStats, InceptionFeatures, fid_from_stats


def condition_values(conditioning: Conditioning, text: str | None, n: int, meta: dict) -> list:
    """The condition of each of n images (`--classes`, or all classes evenly, as FID protocols sample)."""
    if n < 1:
        raise UserError("-n must be >= 1")
    return conditioning.values(text, n, meta)


class ImageSampler:
    """Decoded samples for given image indices. Image i's noise comes from a generator seeded by
    seed * 1_000_003 + i, so the batch size, the number of processes and reruns that fill in missing images do
    not change image i. `latents(noise, values, seeds, generators)` generates the batch's (scaled) latents."""

    def __init__(self, latents, autoencoder, scaling_factor: float, shape: tuple, seed: int, device, dtype: str):
        self.latents, self.ae, self.scaling, self.shape = latents, autoencoder, scaling_factor, shape
        self.seed, self.device, self.dtype = seed, device, dtype

    def images(self, idx: list[int], values: list) -> torch.Tensor:
        seeds = [self.seed * 1_000_003 + i for i in idx]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")
        with torch.no_grad(), autocast:
            z = self.latents(noise, [values[i] for i in idx], seeds, gens)
        if not torch.isfinite(z).all():
            raise NonFiniteError("sampling produced NaN/Inf latents")
        with torch.no_grad():
            return decode_scaled(self.ae, z, self.scaling)


def compute_gfid(images, reference: str, device, resolution: int | None = None, batch_size: int = 32) -> float:
    """gFID of generated images (a folder or a list of files) against reference statistics (.npz with mu,
    sigma, as pytorch-fid writes) or a reference image folder (ADM center crop to `resolution`), with
    dcae.metrics' TF-Inception protocol."""

    inception = InceptionFeatures().to(device).eval()
    if str(reference).endswith(".npz"):
        ref = GaussianStats.load(reference)
    else:
        ref, _ = dataset_stats(collect_images(reference), inception, resolution, batch_size, progress=True, desc="ref")
    gen, skipped = dataset_stats(collect_images(images), inception, None, batch_size, progress=True, desc="gFID")
    if skipped:
        raise UserError(f"{len(skipped)} generated image(s) could not be read, e.g. {skipped[0]}")
    return float(fid_from_stats(gen, ref))


def write_samples(
    images, values: list, out, n: int, batch_size: int, overwrite: bool, rank: int, world: int, desc: str = "sampling"
) -> list:
    """Generate and write images out/images/000000.png ... for indices 0..n-1; `images(indices, values)`
    yields one image tensor per index. Image i belongs to process i % world (fixed by the index, not by
    what exists when a process looks: the others may already be writing); reruns make only the missing
    ones. Returns every path, after all processes have written theirs."""  # fmt: skip
    paths = [Path(out) / "images" / f"{i:06d}.png" for i in range(n)]
    todo = [i for i in range(n) if i % world == rank and (overwrite or not paths[i].exists())]
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=n < 2 or rank != 0)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        for i, img in zip(idx, images(idx, values)):
            save_image(img, paths[i])
        bar.update(len(idx))
    bar.close()
    if world > 1:
        torch.distributed.barrier()  # every image is written before the first process reads them
    return paths
