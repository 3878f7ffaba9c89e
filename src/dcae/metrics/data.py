"""Evaluation inputs: image folders, single images and webdataset-style .tar shards, read in sorted
order, ADM center-cropped, batched by a DataLoader; unreadable files are skipped and reported.

Tar shards are read with Python's `tarfile` (no webdataset dependency): every member whose name ends in
an image extension is one sample, named `<shard>/<member>`.
"""

from __future__ import annotations

import functools
import glob
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dcae.data.images import IMAGE_EXTENSIONS, ImageReadError, center_crop_arr, decode_image_bytes, find_images
from dcae.errors import UserError

TAR_SUFFIXES = (".tar",)


@dataclass(frozen=True)
class ImageRef:
    """One sample: a file, or a member of a tar shard (`member` set, read at `offset`)."""

    name: str  # relative name used to report and to pair files
    path: str
    member: str | None = None
    offset: int = 0
    size: int = 0
    mtime: float = 0.0

    def fingerprint(self) -> tuple[str, int, float]:
        return (self.name, self.size, self.mtime)


# ----------------------------------------------------------------------------------------- listing
def expand_braces(pattern: str) -> list[str]:
    """webdataset-style `shard-{000..009}.tar` and `{a,b}` expansion (zero padding kept)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        items = [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def _expand_source(source: str) -> list[Path]:
    paths: list[Path] = []
    for pattern in expand_braces(str(source)):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"no files match {pattern}")
        paths += [Path(p) for p in matches]
    return paths


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_tar(path: Path, prefix: str) -> list[ImageRef]:
    """Image members of a tar shard, in archive order."""
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _is_image_name(m.name)]
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"cannot read tar shard {path}: {exc}") from exc
    return [ImageRef(f"{prefix}/{m.name}", str(path), m.name, m.offset_data, m.size, float(m.mtime)) for m in members]


def _file_ref(path: Path, name: str) -> ImageRef:
    st = path.stat()
    return ImageRef(name, str(path), size=st.st_size, mtime=st.st_mtime)


def _list_dir(root: Path) -> list[ImageRef]:
    refs = [_file_ref(p, p.relative_to(root).as_posix()) for p in find_images(root)]
    for shard in sorted(p for p in root.rglob("*") if p.suffix.lower() in TAR_SUFFIXES and p.is_file()):
        refs += list_tar(shard, shard.relative_to(root).as_posix())
    return refs


def collect_images(
    sources: str | os.PathLike | Sequence[str | os.PathLike], limit: int | None = None
) -> list[ImageRef]:
    """All samples of folders / image files / tar shards (globs and `{000..009}` allowed), sorted per
    source; the first `limit`. Missing paths raise FileNotFoundError, no images at all a UserError."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    refs: list[ImageRef] = []
    for source in sources:
        for path in _expand_source(str(source)):
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            if path.is_dir():
                refs += _list_dir(path)
            elif path.suffix.lower() in TAR_SUFFIXES:
                refs += list_tar(path, path.name)
            elif _is_image_name(path.name):
                refs.append(_file_ref(path, path.name))
            else:
                raise UserError(f"{path} is neither an image, a folder nor a .tar shard")
    if not refs:
        shown = ", ".join(str(s) for s in sources)
        raise UserError(f"no images found in {shown} (looked for {', '.join(IMAGE_EXTENSIONS)} and .tar shards)")
    return refs[:limit] if limit is not None else refs


def dataset_id(sources: Sequence[str | os.PathLike]) -> str:
    """Stable identifier of the inputs for the statistics cache (absolute paths)."""
    return "|".join(str(Path(s).resolve()) for s in sources)


# ----------------------------------------------------------------------------------------- reading
_TAR_HANDLES: dict[str, tarfile.TarFile] = {}


def _read_bytes(ref: ImageRef) -> bytes:
    if ref.member is None:
        return Path(ref.path).read_bytes()
    if not _is_compressed(ref.path):
        with open(ref.path, "rb") as f:  # plain tar: the member's bytes sit at a fixed offset
            f.seek(ref.offset)
            return f.read(ref.size)
    tar = _TAR_HANDLES.get(ref.path)  # compressed: one open handle per worker process
    if tar is None:
        tar = _TAR_HANDLES[ref.path] = tarfile.open(ref.path)  # noqa: SIM115 (kept open for reuse)
    extracted = tar.extractfile(ref.member)
    if extracted is None:
        raise ImageReadError(f"cannot read {ref.name}: not a regular file")
    return extracted.read()


@functools.lru_cache(maxsize=4096)
def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        magic = f.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z"


def read_image(ref: ImageRef) -> np.ndarray:
    """HxWx3 uint8 (grayscale / palette / RGBA / 16-bit handled like `load_image_uint8`)."""
    try:
        data = _read_bytes(ref)
    except FileNotFoundError:
        raise
    except Exception as exc:  # a damaged tar member
        raise ImageReadError(f"cannot read image {ref.name}: {exc}") from exc
    return decode_image_bytes(data, ref.name)


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
        except ImageReadError as exc:
            return i, None, str(exc)
        except FileNotFoundError:  # removed since it was listed
            return i, None, f"cannot read image {ref.name}: it does not exist (any more)"
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
