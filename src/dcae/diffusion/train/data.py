"""The training data of a diffusion run: a latent cache opened as a `CacheDataset`, and each process's share of
each step's global batch.

Which dataset reads a cache is decided here, once, by the cache's record; the loop only uses the dataset
protocol (dcae.diffusion.cache.CacheDataset)."""

from __future__ import annotations

import os

import torch

from dcae.diffusion import cache
from dcae.diffusion.c2i.latents import LatentDataset
from dcae.diffusion.cache import CacheDataset
from dcae.diffusion.t2i.cache import TextLatentDataset
from dcae.errors import UserError

# The dataset of each kind of conditioning a cache can hold.
DATASETS = {"class": LatentDataset, "none": LatentDataset, "text": TextLatentDataset}


def open_cache(root: str | os.PathLike, seed: int = 0, use_flip: bool = True) -> CacheDataset:
    """The dataset of a complete latent cache (`dcae latents` or `dcae t2i cache`)."""
    index = cache.read_index(root)
    return DATASETS[index.kind](root, use_flip=use_flip, seed=seed, index=index)


def data_batches(ds: CacheDataset, batch_size: int, seed: int, rank: int, world: int, start_step: int,
                 num_workers: int = 0):  # fmt: skip
    """Yield this process's (latents, *condition fields) for steps start_step, start_step + 1, ...: rank r
    takes the r-th slice of each global batch of the epoch (`ds.epoch_batches`)."""
    per_proc = batch_size // world
    steps_per_epoch = len(ds.epoch_batches(0, seed, batch_size))
    if steps_per_epoch == 0:
        raise UserError(f"the dataset has {len(ds)} latents, fewer than one batch of {batch_size}: lower batch_size")
    epoch, offset = divmod(start_step, steps_per_epoch)
    while True:
        ds.set_epoch(epoch)
        plan = ds.epoch_batches(epoch, seed, batch_size)
        batches = [plan[b][rank * per_proc : (rank + 1) * per_proc] for b in range(offset, len(plan))]
        yield from torch.utils.data.DataLoader(
            ds, batch_sampler=batches, num_workers=num_workers, pin_memory=torch.cuda.is_available()
        )
        epoch, offset = epoch + 1, 0
