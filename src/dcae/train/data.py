"""Training data: image folders, webdataset-style .tar shards and scikit-image's bundled photos.

Resumability: the sampler walks a seeded permutation per epoch, and every sample's augmentation RNG is
seeded from (seed, epoch, position), so batch k is the same whatever the worker count and whether the
run was interrupted. The data position saved in checkpoints is just the number of batches consumed.

Listing and reading go through `dcae.data.sources` (the same for evaluation): broken tar shards are skipped
when listed, unreadable files are skipped with a warning (once per file and process) and counted: the
sample is replaced by the next readable one in the permutation, so batch shapes stay fixed (needed for DDP).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image

from dcae.data.images import ImageReadError, uint8_to_tensor
from dcae.data.sources import (  # noqa: F401 (SKIMAGE_PHOTOS, skimage_photo: re-exported)
    SKIMAGE_PHOTOS,
    ImageList,
    ImageRef,
    Skipped,
    list_images,
    read_image,
    read_images,
    record_skip,
    skimage_photo,
)
from dcae.errors import UserError

MAX_CONSECUTIVE_FAILURES = 64  # then the data set is declared unusable

# One image of the training data; `name` is its location (path, `<shard>:<member>`, `skimage:<photo>`).
Item = ImageRef


# ----------------------------------------------------------------------------- listing
def list_items(specs: list[str]) -> ImageList:
    """Expand data specs (folders, files, .tar shards or globs of them, "skimage:a,b" / "skimage:*"), named
    by location; broken shards are skipped, named in a warning and counted in the result's `skipped`."""
    return list_images(specs, naming="location", allow_empty=True)


def split_items(cfg_train: list[str], cfg_val: list[str], holdout: int) -> tuple[list[Item], list[Item]]:
    """(train, val): explicit val specs, or the last `holdout` train items sorted by name."""
    train = list_items(cfg_train)
    if not train:
        raise UserError("data.train: no training images found")
    if cfg_val:
        return train, list_items(cfg_val)
    if holdout:
        ordered = sorted(train, key=lambda it: it.name)
        if holdout >= len(ordered):
            raise UserError(f"data.holdout={holdout} leaves no training images (found {len(ordered)})")
        return ImageList(ordered[:-holdout], train.skipped, train.sources), ordered[-holdout:]
    return train, []


# ----------------------------------------------------------------------------- augmentation
def resize_short_side(arr: np.ndarray, size: int) -> np.ndarray:
    """Bicubic (antialiased) resize so that the short side is `size`."""
    h, w = arr.shape[:2]
    if min(h, w) == size:
        return arr
    scale = size / min(h, w)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return np.asarray(Image.fromarray(arr).resize(new, resample=Image.BICUBIC, reducing_gap=3.0))


def augment(
    arr: np.ndarray,
    resolution: int,
    rng: np.random.Generator,
    crop: str = "random",
    resize: bool = True,
    scale_range: tuple[float, float] = (1.0, 1.0),
    hflip: float = 0.5,
) -> np.ndarray:
    """Resize the short side (optional, random scale), crop `resolution` (random/center), maybe flip."""
    short = min(arr.shape[:2])
    if resize:
        lo, hi = scale_range
        target = round(resolution * (lo if lo == hi else rng.uniform(lo, hi)))
        arr = resize_short_side(arr, max(target, resolution))
    elif short < resolution:  # too small to crop: upscale just enough
        arr = resize_short_side(arr, resolution)
    h, w = arr.shape[:2]
    if crop == "random":
        top, left = int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))
    else:
        top, left = (h - resolution) // 2, (w - resolution) // 2
    arr = arr[top : top + resolution, left : left + resolution]
    if hflip > 0 and rng.random() < hflip:
        arr = arr[:, ::-1]
    return np.array(arr, copy=True)  # contiguous, writable, and never a view of a cached photo


# ----------------------------------------------------------------------------- dataset / sampler
class ImageDataset(torch.utils.data.Dataset):
    """Map-style data set indexed by (index, epoch, position) from `ResumableBatchSampler`."""

    def __init__(
        self,
        items: list[Item],
        resolution: int,
        seed: int,
        crop: str = "random",
        resize: bool = True,
        scale_range: tuple[float, float] = (1.0, 1.0),
        hflip: float = 0.5,
    ) -> None:
        self.items = items
        self.resolution = resolution
        self.seed = seed
        self.aug = dict(crop=crop, resize=resize, scale_range=tuple(scale_range), hflip=hflip)
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[torch.Tensor, int]:
        """-> (3xRxR image in [-1, 1], number of unreadable files skipped to get it)."""
        index, epoch, position = key
        skipped, last = 0, ""
        for k in range(MAX_CONSECUTIVE_FAILURES):
            item = self.items[(index + k) % len(self.items)]
            try:
                arr = read_image(item)
            except ImageReadError as exc:
                skipped, last = skipped + 1, str(exc)
                if item.name not in self._warned:  # named once per file and process, counted every time
                    self._warned.add(item.name)
                    record_skip(None, Skipped(item.name, last))
                continue
            rng = np.random.default_rng([self.seed, epoch, position])
            return uint8_to_tensor(augment(arr, self.resolution, rng, **self.aug)), skipped
        raise UserError(
            f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row (last: {last}): is the data set corrupt?"
        )


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (index, epoch, position) for one process.

    Epoch e is a permutation of the data set seeded with (seed, e); each step of the sampler takes
    batch_size * world_size consecutive positions and cuts them into one slice per rank, so every rank sees
    different images. `batch_size` is per process and micro-batch (the trainer's global batch divided by the
    processes and accumulation steps). `start_batch` (batches consumed before) resumes exactly where a run
    stopped.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise UserError(
                f"{n} training images are fewer than one micro-batch on all processes ({batch_size} x {world_size} "
                "processes): lower the phase's batch_size"
            )
        self.batches_per_epoch = n // self.global_batch  # the incomplete tail of each epoch is dropped

    def position(self, batches_consumed: int) -> dict[str, int]:
        epoch, batch = divmod(batches_consumed, self.batches_per_epoch)
        return {"epoch": epoch, "batch_in_epoch": batch, "batches_consumed": batches_consumed}

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, batch = divmod(self.start_batch, self.batches_per_epoch)
        while True:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            for b in range(batch, self.batches_per_epoch):
                start = b * self.global_batch + self.rank * self.batch_size
                yield [(int(perm[p]), epoch, p) for p in range(start, start + self.batch_size)]
            epoch, batch = epoch + 1, 0

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(), which we never call
        return 2**62


def collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, int]:
    return torch.stack([s[0] for s in samples]), sum(s[1] for s in samples)


def make_loader(
    dataset: ImageDataset, sampler: ResumableBatchSampler, num_workers: int, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Workers must not inherit a thread pool each: the training process already uses the cores.
        worker_init_fn=_limit_worker_threads if num_workers else None,
    )


def _limit_worker_threads(_: int) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def load_val_images(items: list[Item], max_images: int) -> tuple[list[np.ndarray], int]:
    """Validation photos as uint8 arrays (unreadable ones skipped, named and counted; a UserError when none
    of them can be read)."""
    out, skipped = read_images(items, max_images, what="validation images")
    return out, len(skipped)
