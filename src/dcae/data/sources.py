"""Where images come from, for training, evaluation and metrics: one reference type (`ImageRef`), one
listing of user sources (`list_images`), one reader (`read_image`, and `read_size` for the size from the
header) and one policy for what cannot be read.

Sources: folders (searched recursively for image files and .tar shards), image files, webdataset-style .tar
shards (plain or compressed; every member with an image extension is one sample, other members such as
`.json`/`.cls` are ignored), globs and `{000..009}` / `{a,b}` patterns of these, and "skimage:a,b" /
"skimage:*" (scikit-image's bundled photos, for offline demos and tests).

Order: sources as given; a pattern's matches sorted; in a folder its image files sorted by path, then its
.tar shards sorted by path, each in archive order.

Names (`naming`): "relative" (evaluation: the keys of reports and of pairing) names a file of a folder by its
path relative to the folder, a file given directly by its file name, a tar member `<shard>/<member>` (the
shard relative to its folder, or its file name); "location" (training) names every image by where it is:
the path as given, `<shard path>:<member>`, `skimage:<photo>`.

Policy for what cannot be read (the same for every caller): a broken shard (its index cannot be read) or an
unreadable image is named (its path, and the member for tars), skipped with a warning and counted
(`ImageList.skipped` for shards found broken while listing, the skipped list of `read_images`, or the
caller's own count); when nothing readable is left, a one-line `UserError` names the sources and the first
problem. Paths that do not exist raise FileNotFoundError.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import lzma
import os
import re
import tarfile
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dcae.data.images import IMAGE_EXTENSIONS, ImageReadError, decode_image_bytes, image_size, load_image_uint8
from dcae.errors import UserError

TAR_SUFFIXES = (".tar",)
SKIMAGE = "skimage"  # the `path` of a scikit-image photo; its `member` is the photo's name
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
Naming = Literal["relative", "location"]
Source = str | os.PathLike
# What reading a shard's index can raise when the shard is damaged (truncated gzip/xz streams included).
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class ImageRef:
    """One image: a file, a member of a tar shard (`member` set, read at `offset`), or a scikit-image
    photo (`path` "skimage", `member` the photo's name)."""

    name: str  # how reports name it (see `Naming`); the key of pairing in evaluation
    path: str  # the file, the tar shard, or "skimage"
    member: str | None = None
    offset: int = 0
    size: int = 0
    mtime: float = 0.0

    @property
    def kind(self) -> Literal["file", "tar", "skimage"]:
        if self.member is None:
            return "file"
        return "skimage" if self.path == SKIMAGE else "tar"

    @property
    def location(self) -> str:
        """Where it is: the path, `<shard>:<member>` or `skimage:<photo>`."""
        return self.path if self.member is None else f"{self.path}:{self.member}"

    @property
    def source(self) -> str:  # the training data's former `Item.source`
        return self.path

    @property
    def key(self) -> str:  # the training data's former `Item.key`: member / photo name, "" for files
        return self.member or ""

    def fingerprint(self) -> tuple[str, int, float]:
        return (self.name, self.size, self.mtime)


@dataclass(frozen=True)
class Skipped:
    """A shard or image that could not be read: its name and a one-line message naming it."""

    name: str  # the shard's path, or the image's name
    error: str
    what: str = "image"  # or "tar shard"

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "error": self.error}


class ImageList(list):
    """The readable references of a listing (a list), with what was skipped while listing (`skipped`:
    broken tar shards) and the sources it came from."""

    def __init__(self, refs=(), skipped: Sequence[Skipped] = (), sources: Sequence[Source] = ()) -> None:
        super().__init__(refs)
        self.skipped = list(skipped)
        self.sources = [str(s) for s in sources]

    def head(self, limit: int | None) -> ImageList:
        """The first `limit` references (all with None), with the same skip record."""
        return self if limit is None else ImageList(self[:limit], self.skipped, self.sources)


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


def expand_paths(source: Source) -> list[Path]:
    """The paths a source names: brace patterns expanded, globs matched (sorted); a pattern that matches
    nothing raises FileNotFoundError. Paths without a pattern are returned as they are (checked later)."""
    paths: list[Path] = []
    for pattern in expand_braces(str(source)):
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise FileNotFoundError(f"no files match {pattern}")
        paths += [Path(p) for p in matches]
    return paths


def is_image_path(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def is_tar_path(path: Path) -> bool:
    return path.suffix.lower() in TAR_SUFFIXES


def list_images(
    sources: Source | Sequence[Source], naming: Naming = "relative", allow_empty: bool = False
) -> ImageList:
    """Every image of `sources` (see the module's docstring for the forms, order and names). Broken tar
    shards are skipped with a warning and recorded in the result's `skipped`; if that leaves nothing, a
    UserError names the sources and the first broken shard. With nothing found at all: a UserError, or an
    empty list with `allow_empty`. Missing paths raise FileNotFoundError."""

    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    sources = [str(s) for s in sources]
    refs, skipped = list_refs(sources, naming)
    if not refs and skipped:
        raise nothing_readable(sources, skipped)
    if not refs and not allow_empty:
        extensions = ", ".join(IMAGE_EXTENSIONS)
        raise UserError(f"no images found in {_shown(sources)} (looked for {extensions} and .tar shards)")
    return ImageList(refs, skipped, sources)


def list_refs(sources: Sequence[Source], naming: Naming = "relative") -> tuple[list[ImageRef], list[Skipped]]:
    """`list_images` without its checks of the result: the references found and the broken shards skipped
    (each named in a warning), for callers that put image sources together with others and judge the
    whole (`dcae.data.captions`). Missing paths raise FileNotFoundError."""
    refs: list[ImageRef] = []
    skipped: list[Skipped] = []
    for source in map(str, sources):
        if source.startswith(f"{SKIMAGE}:"):
            refs += _skimage_refs(source)
            continue
        for path in expand_paths(source):
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            if path.is_dir():
                refs += _list_folder(path, naming, skipped)
            elif is_tar_path(path):
                refs += list_tar(path, path.name if naming == "relative" else str(path), naming, skipped)
            elif is_image_path(path):
                refs.append(_file_ref(path, path.name if naming == "relative" else str(path)))
            else:
                raise UserError(f"{path} is neither an image, a folder nor a .tar shard")
    return refs, skipped


def list_tar(
    path: Path, prefix: str, naming: Naming = "relative", skipped: list[Skipped] | None = None
) -> list[ImageRef]:
    """Image members of a tar shard, in archive order, named `<prefix>/<member>` ("relative") or
    `<path>:<member>` ("location"). A shard whose index cannot be read is skipped whole: a warning names
    it, and it is appended to `skipped`."""
    try:
        if not path.is_file():  # a FIFO would block tarfile
            raise tarfile.ReadError("not a regular file")
        with tarfile.open(path) as tar:  # plain or compressed
            every = tar.getmembers()
            members = [m for m in every if m.isfile() and is_image_path(Path(m.name))]
            end = _early_end(tar, _is_compressed(str(path)))
    except TAR_ERRORS as exc:
        record_skip(skipped, Skipped(str(path), f"cannot read tar shard {path}: {one_line(exc)}", "tar shard"))
        return []
    if end:  # the members before are whole and listed; what followed is lost
        record_skip(skipped, Skipped(str(path), f"tar shard {path} is cut short or damaged after its {len(every)} "
                                     f"member(s): {end}; the rest of it cannot be read", "tar shard"))  # fmt: skip
    name = (lambda m: f"{prefix}/{m}") if naming == "relative" else (lambda m: f"{path}:{m}")
    return [ImageRef(name(m.name), str(path), m.name, m.offset_data, m.size, float(m.mtime)) for m in members]


def _early_end(tar: tarfile.TarFile, compressed: bool) -> str | None:
    """Why a read archive ended before its end-of-archive block (tarfile stops without a word at a header
    cut short, missing or damaged after the first), or None when it has one."""
    read = tar.fileobj.tell() - tar.offset  # how much of the block at tar.offset there was
    if compressed:  # a cut stream fails in the decompressor; re-reading a block would decompress it again
        return None if read >= tarfile.BLOCKSIZE else f"it ends at byte {tar.offset + max(read, 0)}"
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if not block:
        return f"it ends at byte {tar.offset}, without an end-of-archive block"
    if block.count(0) != len(block):
        if len(block) < tarfile.BLOCKSIZE:
            return f"it ends inside the header at byte {tar.offset}"
        return f"the header at byte {tar.offset} is damaged"
    return None  # the end-of-archive block (perhaps itself cut short: nothing follows it)


def record_skip(skipped: list[Skipped] | None, item: Skipped, warn: bool = True) -> None:
    """The one way something unreadable is skipped: a warning naming it, and a record for the count."""
    if warn:
        warnings.warn(f"skipping unreadable {item.what}: {item.error}", stacklevel=3)
    if skipped is not None:
        skipped.append(item)


def nothing_readable(sources: Sequence[Source], skipped: Sequence[Skipped]) -> Exception:
    """The UserError for sources of which nothing could be read (one line: the sources, the count, the
    first problem)."""

    kinds = sorted({s.what for s in skipped})
    return UserError(
        f"nothing readable in {_shown(sources)}: {len(skipped)} unreadable {' / '.join(kinds)}(s) skipped; "
        f"first: {skipped[0].error}"
    )


def _shown(sources: Sequence[Source], most: int = 3) -> str:
    shown = ", ".join(str(s) for s in sources[:most])
    return shown + (f" and {len(sources) - most} more" if len(sources) > most else "")


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace collapsed), or its type when it has none."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _file_ref(path: Path, name: str) -> ImageRef:
    st = path.stat()
    return ImageRef(name, str(path), size=st.st_size, mtime=st.st_mtime)


def _list_folder(root: Path, naming: Naming, skipped: list[Skipped]) -> list[ImageRef]:
    """Image files sorted by path (as `find_images`), then tar shards sorted by path; one walk of the tree."""
    images, shards = [], []
    for p in root.rglob("*"):
        if is_image_path(p) and p.is_file():
            images.append(p)
        elif is_tar_path(p) and p.is_file():
            shards.append(p)
    relative = naming == "relative"
    refs = [_file_ref(p, p.relative_to(root).as_posix() if relative else str(p)) for p in sorted(images)]
    for shard in sorted(shards):
        refs += list_tar(shard, shard.relative_to(root).as_posix() if relative else str(shard), naming, skipped)
    return refs


def _skimage_refs(source: str) -> list[ImageRef]:
    names = source.removeprefix(f"{SKIMAGE}:")
    chosen = SKIMAGE_PHOTOS if names in ("", "*") else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in SKIMAGE_PHOTOS]
    if unknown:
        raise UserError(f"unknown scikit-image photo {unknown[0]!r}; available: {', '.join(SKIMAGE_PHOTOS)}")
    return [ImageRef(f"{SKIMAGE}:{n}", SKIMAGE, n) for n in chosen]


# ----------------------------------------------------------------------------------------- reading
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


_TAR_HANDLES: dict[str, tarfile.TarFile] = {}


@functools.lru_cache(maxsize=4096)
def _is_compressed(path: str) -> bool:
    with open(path, "rb") as f:
        magic = f.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:3] == b"\xfd7z"


def _member_bytes(ref: ImageRef) -> bytes:
    if not _is_compressed(ref.path):
        with open(ref.path, "rb") as f:  # plain tar: the member's bytes sit at a fixed offset
            f.seek(ref.offset)
            data = f.read(ref.size)
        if len(data) != ref.size:
            raise ImageReadError(
                f"cannot read image {ref.name}: the shard ends inside it ({len(data)} of {ref.size} bytes)"
            )
        return data
    tar = _TAR_HANDLES.get(ref.path)  # compressed: one open handle per worker process
    if tar is None:
        tar = _TAR_HANDLES[ref.path] = tarfile.open(ref.path)  # noqa: SIM115 (kept open for reuse)
    extracted = tar.extractfile(ref.member)
    if extracted is None:
        raise ImageReadError(f"cannot read image {ref.name}: not a regular file")
    return extracted.read()


def read_image(ref: ImageRef) -> np.ndarray:
    """HxWx3 uint8, upright (EXIF orientation applied; grayscale / palette / RGBA / 16-bit handled like
    `load_image_uint8`, for files and tar members alike: both go through its reader); ImageReadError
    naming `ref.name` when it cannot be read or decoded, a file gone since it was listed included."""
    if ref.kind == "skimage":
        return skimage_photo(ref.member)
    with _named(ref):
        if ref.kind == "file":
            return load_image_uint8(ref.path, ref.name)
        data = _member_bytes(ref)
    return decode_image_bytes(data, ref.name)


@contextlib.contextmanager
def _named(ref: ImageRef):
    """What goes wrong reading `ref` as one ImageReadError naming it."""
    try:
        yield
    except FileNotFoundError:
        raise ImageReadError(f"cannot read image {ref.name}: it does not exist (any more)") from None
    except ImageReadError:
        raise
    except Exception as exc:  # a damaged shard
        raise ImageReadError(f"cannot read image {ref.name}: {one_line(exc)}") from exc


def read_size(ref: ImageRef) -> tuple[int, int]:
    """The upright (height, width) of `ref`, as `read_image` would return it, from the image's header
    (`image_size`: files and tar members are not decoded; a member's bytes are read); ImageReadError naming
    `ref.name` like `read_image` (the pixel data may still turn out corrupt when read)."""
    if ref.kind == "skimage":
        return skimage_photo(ref.member).shape[:2]
    with _named(ref):
        data = ref.path if ref.kind == "file" else _member_bytes(ref)
        return image_size(data, ref.name)


def read_images(
    refs: Sequence[ImageRef], max_images: int | None = None, what: str = "images"
) -> tuple[list[np.ndarray], list[Skipped]]:
    """The first `max_images` readable images of `refs` (all with None) and what was skipped to get them
    (each named in a warning). A UserError when there were images to read and none could be."""
    out: list[np.ndarray] = []
    skipped: list[Skipped] = []
    for ref in refs:
        if max_images is not None and len(out) >= max_images:
            break
        try:
            out.append(read_image(ref))
        except ImageReadError as exc:
            record_skip(skipped, Skipped(ref.name, str(exc)))
    if skipped and not out:
        raise UserError(f"none of the {len(skipped)} {what} could be read; first: {skipped[0].error}")
    return out, skipped
