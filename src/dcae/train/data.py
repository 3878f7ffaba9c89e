"""Training data: image folders, webdataset-style .tar shards and scikit-image's bundled photos.

Resumability: the sampler walks a seeded permutation per epoch, and every sample's augmentation RNG is
seeded from (seed, epoch, position), so batch k is the same whatever the worker count and whether the
run was interrupted. The data position saved in checkpoints is just the number of batches consumed.

Unreadable files are skipped with a warning (once per file and process) and counted: the sample is
replaced by the next readable one in the permutation, so batch shapes stay fixed (needed for DDP).
"""

from __future__ import annotations

import functools
import glob
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dcae.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    decode_image_bytes,
    find_images,
    load_image_uint8,
    uint8_to_tensor,
)
from dcae.errors import UserError

MAX_CONSECUTIVE_FAILURES = 64  # then the data set is declared unusable


@dataclass(frozen=True)
class Item:
    """One image: a file, a member of a tar shard (byte range), or a scikit-image photo."""

    source: str  # file path, tar path, or "skimage"
    key: str  # member name / skimage name ("" for plain files)
    offset: int = 0
    size: int = 0

    @property
    def name(self) -> str:
        return f"{self.source}:{self.key}" if self.key else self.source


# ----------------------------------------------------------------------------- listing
SKIMAGE_PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "motorcycle_left",
    "motorcycle_right",
    "camera",
    "brick",
    "grass",
    "gravel",
    "coins",
    "moon",
    "clock",
)


@functools.cache
def skimage_photo(name: str) -> np.ndarray:
    """A scikit-image bundled photo as HxWx3 uint8 (grayscale replicated); decoded once per process."""
    import skimage.data

    if name in ("motorcycle_left", "motorcycle_right"):
        left, right, _ = skimage.data.stereo_motorcycle()
        arr = left if name == "motorcycle_left" else right
    else:
        if name not in SKIMAGE_PHOTOS:
            raise UserError(f"unknown scikit-image photo {name!r}; available: {', '.join(SKIMAGE_PHOTOS)}")
        arr = getattr(skimage.data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = np.ascontiguousarray(arr[..., :3].astype(np.uint8))
    arr.flags.writeable = False  # shared by every sample cut from it
    return arr


def list_items(specs: list[str]) -> list[Item]:
    """Expand data specs (folders, files, .tar shards or globs of them, "skimage:a,b" / "skimage:*")."""
    items: list[Item] = []
    for spec in specs:
        if spec.startswith("skimage:"):
            names = spec.removeprefix("skimage:")
            chosen = SKIMAGE_PHOTOS if names in ("", "*") else [n.strip() for n in names.split(",") if n.strip()]
            items += [Item("skimage", n) for n in chosen]
            continue
        paths = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
        if not paths:
            raise UserError(f"data: {spec} matches no files")
        for p in paths:
            path = Path(p)
            if path.is_file() and path.suffix == ".tar":
                items += list_tar(path)
            elif path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"data: {path} is neither an image nor a .tar shard")
            else:
                items += [Item(str(f), "") for f in find_images(path)]
    return items


def list_tar(path: Path) -> list[Item]:
    """Image members of an (uncompressed) tar shard, as byte ranges; a broken shard is skipped with a warning."""
    out = []
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile() and Path(m.name).suffix.lower() in IMAGE_EXTENSIONS:
                    out.append(Item(str(path), m.name, m.offset_data, m.size))
    except (tarfile.TarError, OSError) as exc:
        warnings.warn(f"skipping unreadable tar shard {path}: {exc}", stacklevel=2)
    return out


def split_items(cfg_train: list[str], cfg_val: list[str], holdout: int) -> tuple[list[Item], list[Item]]:
    """(train, val): explicit val specs, or the last `holdout` train items sorted by name."""
    train = list_items(cfg_train)
    if not train:
        raise UserError("data.train: no training images found")
    if cfg_val:
        return train, list_items(cfg_val)
    if holdout:
        train = sorted(train, key=lambda it: it.name)
        if holdout >= len(train):
            raise UserError(f"data.holdout={holdout} leaves no training images (found {len(train)})")
        return train[:-holdout], train[-holdout:]
    return train, []


def read_item(item: Item) -> np.ndarray:
    """HxWx3 uint8; ImageReadError (naming the file/member) when it cannot be decoded."""
    if item.source == "skimage":
        return skimage_photo(item.key)
    if not item.key:
        return load_image_uint8(item.source)
    try:
        with open(item.source, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.size)
    except OSError as exc:
        raise ImageReadError(f"cannot read image {item.name}: {exc}") from exc
    return decode_image_bytes(data, item.name)  # grayscale/RGBA/16-bit handled like image files


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
        skipped = 0
        for k in range(MAX_CONSECUTIVE_FAILURES):
            item = self.items[(index + k) % len(self.items)]
            try:
                arr = read_item(item)
            except ImageReadError as exc:
                skipped += 1
                if item.name not in self._warned:
                    self._warned.add(item.name)
                    warnings.warn(f"skipping unreadable image: {exc}", stacklevel=2)
                continue
            rng = np.random.default_rng([self.seed, epoch, position])
            return uint8_to_tensor(augment(arr, self.resolution, rng, **self.aug)), skipped
        raise UserError(f"{MAX_CONSECUTIVE_FAILURES} unreadable images in a row: is the data set corrupt?")


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (index, epoch, position) for one process.

    Epoch e is a permutation of the data set seeded with (seed, e); a global batch of
    batch_size * world_size consecutive positions is cut into one slice per rank, so every rank sees
    different images. `start_batch` (batches consumed before) resumes exactly where a run stopped.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start_batch: int = 0
    ) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.start_batch = rank, world_size, start_batch
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            raise UserError(
                f"{n} training images are fewer than one global batch ({batch_size} x {world_size} processes)"
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
    """Validation photos as uint8 arrays (unreadable ones skipped and counted)."""
    out, skipped = [], 0
    for item in items:
        if len(out) >= max_images:
            break
        try:
            out.append(read_item(item))
        except ImageReadError as exc:
            skipped += 1
            warnings.warn(f"skipping unreadable validation image: {exc}", stacklevel=2)
    return out, skipped
