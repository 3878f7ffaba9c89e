"""The training data of a diffusion run: a latent cache opened as a `CacheDataset`, and each process's share of
each step's global batch.

Which dataset reads a cache is decided here, once, by the cache's record; the loop only uses the dataset
protocol (dcae.diffusion.cache.CacheDataset)."""

from __future__ import annotations

import os
import sys

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
    _check_untrained(ds, batch_size, world, say=rank == 0)
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


LEFT_OUT_WARN = 0.05  # the share of the data left out each epoch (remainders of full batches) worth a line


def _check_untrained(ds: CacheDataset, batch_size: int, world: int, say: bool) -> None:
    """For a dataset whose batches each come from one resolution bucket (`ds.untrained`): an error when no
    bucket fills a batch; one warning line (`say`: on the main process) naming the buckets too small for a
    batch, whose images are never trained; one line when the remainders of the others leave out a large share
    each epoch."""
    per = ds.untrained(batch_size)
    if not per:
        return
    total = sum(n for n, _ in per.values())
    small = {b: n for b, (n, _) in per.items() if n < batch_size}
    shown = ", ".join(f"{h}x{w} ({n})" for (h, w), n in small.items())
    if len(small) == len(per):
        largest = max(small.values()) // world * world
        fits = (f"batch_size {largest} or less would train" if largest else
                f"no batch_size divisible by the {world} processes would")  # fmt: skip
        raise UserError(f"no resolution bucket of the {total} images fills a batch of {batch_size}: buckets "
                        f"(height x width: images) {shown}; {fits} (each batch is one bucket's)")  # fmt: skip
    if not say:
        return
    if small:
        never, least = sum(small.values()), min(small.values())
        print(f"dcae: warning: {never} of the {total} images are never trained, each epoch: {len(small)} of "
              f"{len(per)} resolution buckets hold fewer than a batch of {batch_size} (each batch is one bucket's): "
              f"{shown} (height x width: images); a batch_size of at most {least}, or fewer buckets (fewer aspect "
              "ratios), trains them", file=sys.stderr)  # fmt: skip
    left = sum(r for b, (n, r) in per.items() if b not in small)
    if left > LEFT_OUT_WARN * total:
        print(f"dcae: warning: {left} of the {total} images are left out of each epoch: the remainders of "
              f"{len(per) - len(small)} bucket(s) after full batches of {batch_size} (another few each epoch, "
              "by the shuffle)", file=sys.stderr)  # fmt: skip
