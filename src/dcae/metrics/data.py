"""Evaluation inputs: image folders, single images and webdataset-style .tar shards (listed and read by
`dcae.data.sources`, the same as training data), ADM center-cropped, batched by a DataLoader in sorted
order; unreadable files are skipped and reported, broken shards skipped with a warning and counted.

Every image of a tar shard is one sample, named `<shard>/<member>`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcae.data.images import ImageReadError, center_crop_arr
from dcae.data.sources import (  # noqa: F401 (re-exported: the names evaluation code imports from here)
    TAR_SUFFIXES,
    ImageList,
    ImageRef,
    expand_braces,
    list_images,
    read_image,
)


def collect_images(sources: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None) -> ImageList:
    """All samples of folders / image files / tar shards (globs and `{000..009}` allowed), sorted per
    source, named by relative path; the first `limit`. Missing paths raise FileNotFoundError, no images
    at all a UserError; broken shards are skipped with a warning and listed in the result's `skipped`
    (a UserError when nothing readable is left)."""
    return list_images(sources, naming="relative").head(limit)


def dataset_id(sources: Sequence[str | os.PathLike]) -> str:
    """Stable identifier of the inputs for the statistics cache (absolute paths)."""
    return "|".join(str(Path(s).resolve()) for s in sources)


# ----------------------------------------------------------------------------------------- reading
class ImageDataset(torch.utils.data.Dataset):
    """Item i -> (i, uint8 (3, R, R) tensor or None, error message or None). With resolution=None the
    image keeps its size (only for consumers that accept a list of sizes, e.g. Inception)."""

    def __init__(self, refs: Sequence[ImageRef], resolution: int | None) -> None:
        self.refs = list(refs)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        ref = self.refs[i]
        try:
            arr = read_image(ref)
            if self.resolution is not None:
                arr = center_crop_arr(arr, self.resolution)
        except ImageReadError as exc:  # a file removed since it was listed included
            return i, None, str(exc)
        except Exception as exc:  # in a worker process an exception would end the whole run
            return i, None, f"cannot read image {ref.name}: {type(exc).__name__}: {exc}"
        return i, torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1), None


@dataclass
class Batch:
    indices: list[int]
    images: torch.Tensor | list[torch.Tensor]  # (B, 3, R, R) uint8, or a list when sizes differ
    errors: list[tuple[int, str]]  # (index, message) of skipped items


def _collate(items) -> Batch:
    ok = [(i, im) for i, im, _ in items if im is not None]
    errors = [(i, err) for i, im, err in items if im is None]
    images = [im for _, im in ok]
    same_size = len({tuple(im.shape) for im in images}) <= 1
    stacked = torch.stack(images) if images and same_size else images
    return Batch([i for i, _ in ok], stacked if images else torch.empty(0, 3, 0, 0, dtype=torch.uint8), errors)


def iterate_batches(
    refs: Sequence[ImageRef], resolution: int | None, batch_size: int = 16, workers: int = 0
) -> Iterator[Batch]:
    """Batches in the order of `refs` (the DataLoader keeps order for any worker count)."""
    loader = torch.utils.data.DataLoader(
        ImageDataset(refs, resolution),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
    )
    yield from loader
