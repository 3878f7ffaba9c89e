"""Image files <-> tensors in [-1, 1].

Everything that reads images (CLI, evaluation, training, latent extraction) goes through
`load_image` (`_read_upright`), so that grayscale, palette, RGBA and 16-bit files are handled in one place
and an unreadable file is reported by name.

Orientation: an image is read the way viewers show it. Its EXIF Orientation tag (a phone photo stored
sideways, all 8 values; XMP's tiff:Orientation where EXIF has none) is applied first, with the semantics of
Pillow's `ImageOps.exif_transpose`, so every size the project reports or checks (`image_size`, the arrays
read, the heights and widths recorded from them) is the upright size. Only the pixel limit is checked on
the stored size (a rotation does not change the pixel count). Images written by `save_image` carry no EXIF,
so no orientation tag that would turn them again.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError

from dcae.errors import ImageReadError  # defined there (cheap to import for everyone), raised here
from dcae.utils.io import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")
# What the readers make of a file's pixels, for caches of values computed from them (FID reference
# statistics): changed when that changes, so that no cache computed by an older reader is used.
READER_VERSION = "exif-upright-1"  # EXIF orientation applied (before: the stored pixels)


def find_images(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """All image files under `root` (a file, or a folder searched recursively), sorted by path."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root} does not exist")
    if root.is_file():
        return [root]
    pattern = "**/*" if recursive else "*"
    files = [p for p in root.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> HxWx3 uint8. 16-bit files are scaled, alpha is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        bad = int(arr.size - np.isfinite(arr).sum())
        if bad:  # a float image (TIFF) with NaN/Inf pixels: there is no right 8-bit value for them
            raise ValueError(f"{bad} of its {arr.size} pixels are NaN/Inf")
        arr = np.clip(arr * (255.0 if arr.max() <= 1.0 else 1.0) + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


# Pillow warns above Image.MAX_IMAGE_PIXELS and refuses above twice that; the project refuses above it,
# before anything is decoded, so that a forged header cannot make a reader allocate gigabytes.
PIXEL_LIMIT_ENV = "DCAE_MAX_IMAGE_PIXELS"


def max_image_pixels() -> int:
    """The largest image (in pixels) that is read: $DCAE_MAX_IMAGE_PIXELS, else Pillow's MAX_IMAGE_PIXELS."""
    env = os.environ.get(PIXEL_LIMIT_ENV)
    if env:
        limit = int(env)
        if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS * 2:
            Image.MAX_IMAGE_PIXELS = limit  # else Pillow itself would refuse what the user allowed
        return limit
    return Image.MAX_IMAGE_PIXELS or 0


def _too_large(pixels: str, limit: int) -> str:
    return (
        f"{pixels} is more than the limit of {limit} pixels (a decompression bomb?); "
        f"set {PIXEL_LIMIT_ENV} to read larger images"
    )


def _unidentified(source) -> str:
    size = source.getbuffer().nbytes if isinstance(source, io.BytesIO) else Path(source).stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    return f"not an image format Pillow can read ({size} bytes)"


@contextlib.contextmanager
def _opened(source, name: str) -> Iterator[Image.Image]:
    """Image.open with the pixel limit checked on the header, before any pixel is decoded; every
    failure becomes an ImageReadError naming `name` (FileNotFoundError stays itself)."""
    limit = max_image_pixels()
    if isinstance(source, Path) and source.exists() and not source.is_file():
        kind = "a folder" if source.is_dir() else "a special file (FIFO, device, socket)"  # a FIFO would block
        raise ImageReadError(f"cannot read image {name}: it is {kind}, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
            img = Image.open(source)
    except FileNotFoundError:
        raise
    except Image.DecompressionBombError as exc:
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageReadError(f"cannot read image {name}: " + _too_large(
            f"{pixels.group(1)} pixels" if pixels else "the size", limit)) from None  # fmt: skip
    except UnidentifiedImageError:
        raise ImageReadError(f"cannot read image {name}: {_unidentified(source)}") from None
    except Exception as exc:  # PIL raises many types for data it cannot parse
        raise ImageReadError(f"cannot read image {name}: {exc}") from exc
    with img:
        w, h = img.size
        if limit and w * h > limit:
            raise ImageReadError(f"cannot read image {name}: " + _too_large(f"{w}x{h} px", limit))
        if w == 0 or h == 0:
            raise ImageReadError(f"cannot read image {name}: it is {w}x{h} px (empty)")
        yield img


# EXIF Orientation -> the transpose that shows the stored pixels upright (as ImageOps.exif_transpose), done
# on the decoded HxWxC array: FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM, TRANSPOSE, ROTATE_270 (a quarter
# turn clockwise), TRANSVERSE, ROTATE_90 (a quarter turn counter-clockwise).
_UPRIGHT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}
_SIDEWAYS = (5, 6, 7, 8)  # the orientations that swap height and width
_PNG_LATE_CHUNKS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt")  # EXIF / XMP / raw-profile carriers


def exif_orientation(img: Image.Image, header_only: bool = False) -> int:
    """The EXIF Orientation (1-8) of an opened image, read like `ImageOps.exif_transpose` (EXIF, else XMP's
    tiff:Orientation); 1 when absent, out of range or unreadable (viewers then show the stored pixels).

    `header_only`: without decoding the pixels where possible (a PNG's metadata after its pixel data is read
    with the pixels, as Pillow does, only when there is some)."""
    try:
        if header_only and isinstance(img, PngImagePlugin.PngImageFile):
            if _png_metadata_after_pixels(img):
                img.load()  # Pillow reads the chunks after IDAT only with the pixels
            else:  # everything is in `info` already: read it without PngImageFile.getexif's load()
                value = Image.Image.getexif(img).get(ExifTags.Base.Orientation, 1)
                return value if isinstance(value, int) and value in _UPRIGHT else 1
        value = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # a damaged EXIF block, or pixel data that will fail to decode later anyway
        return 1
    return value if isinstance(value, int) and value in _UPRIGHT else 1


def _png_metadata_after_pixels(img: Image.Image) -> bool:
    """True when a PNG has an EXIF or text chunk after its first IDAT; walks the chunk headers only."""
    fp = img.fp
    if fp is None:
        return False
    pos = fp.tell()
    try:
        fp.seek(8)
        seen_idat = False
        while len(head := fp.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            if kind == b"IDAT":
                seen_idat = True
            elif seen_idat and kind in _PNG_LATE_CHUNKS:
                return True
            fp.seek(length + 4, os.SEEK_CUR)  # data and CRC
        return False
    finally:
        fp.seek(pos)


def _stored_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels as the file stores them. Pillow's TIFF reader (unlike the others)
    reports a TIFF's size already turned by its orientation, and turns the pixels itself when it loads them
    (then the orientation is gone from `getexif()`); its tags give the stored size."""
    if isinstance(img, TiffImagePlugin.TiffImageFile):
        w, h = img.tag_v2.get(TiffImagePlugin.IMAGEWIDTH), img.tag_v2.get(TiffImagePlugin.IMAGELENGTH)
        if isinstance(w, int) and isinstance(h, int):
            return w, h
    return img.size


def upright(arr: np.ndarray, orientation: int) -> np.ndarray:
    """A decoded HxWxC array turned the way EXIF `orientation` says viewers show it (a contiguous copy
    unless it is 1)."""
    turn = _UPRIGHT.get(orientation)
    return arr if turn is None else np.ascontiguousarray(turn(arr))


def _read_upright(source, name: str) -> np.ndarray:
    """The one reader of image pixels: HxWx3 uint8 the way viewers show the image (EXIF orientation
    applied, see the module's docstring). Animated files (GIF, WebP, APNG) give their first frame."""
    with _opened(source, name) as img:
        try:
            img.load()
            orientation = exif_orientation(img)  # after load(), like exif_transpose: a PNG's late chunks
            arr = _to_rgb_array(img)
        except Exception as exc:  # truncated or corrupt data, unknown modes
            raise ImageReadError(f"cannot read image {name}: {exc}") from exc
    return upright(arr, orientation)  # per pixel, conversion and transpose commute: the uint8 copy is smallest


def image_size(path: str | os.PathLike | bytes, name: str | None = None) -> tuple[int, int]:
    """The upright (height, width) (EXIF orientation applied, as `load_image_uint8` reads it) from the
    file's header, without decoding; the same checks and errors as `load_image_uint8` up to the pixel data
    (which may still turn out corrupt). `path` may also be an encoded image's bytes (a tar member, as
    `decode_image_bytes` takes them); errors name `name` when given."""
    if isinstance(path, bytes | bytearray):
        source, shown = io.BytesIO(path), name or "<bytes>"
    else:
        source, shown = Path(path), str(path) if name is None else name
    with _opened(source, shown) as img:
        w, h = _stored_size(img)
        return (w, h) if exif_orientation(img, header_only=True) in _SIDEWAYS else (h, w)


def load_image_uint8(path: str | os.PathLike, name: str | None = None) -> np.ndarray:
    """Read a file as HxWx3 uint8 RGB, upright (EXIF orientation applied); raises ImageReadError naming
    the file (or `name`, when given; FileNotFoundError if it does not exist)."""
    return _read_upright(Path(path), str(path) if name is None else name)


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes (e.g. a tar member) -> HxWx3 uint8, upright and converted like
    `load_image_uint8`; ImageReadError names `name` when they cannot be decoded."""
    return _read_upright(io.BytesIO(data), name)


def uint8_to_tensor(arr: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> 3xHxW float32 in [-1, 1]."""
    t = torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1).float()  # copy: PIL arrays are read-only
    return t / 127.5 - 1.0


def tensor_to_uint8(t: torch.Tensor) -> np.ndarray:
    """3xHxW (or 1x3xHxW) tensor in [-1, 1] -> HxWx3 uint8, rounded like the evaluation protocol."""
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {t.shape[0]}")
        t = t[0]
    x = t.detach().to("cpu", torch.float32, copy=True)  # one float copy, then in place: large images
    x.clamp_(-1, 1).add_(1.0).mul_(127.5).round_()
    return x.to(torch.uint8).permute(1, 2, 0).numpy()


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Read an image file as a 3xHxW float32 tensor in [-1, 1], upright (EXIF orientation applied)."""
    return uint8_to_tensor(load_image_uint8(path))


def save_image(t: torch.Tensor | np.ndarray, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a [-1, 1] tensor (or uint8 array) atomically; the format follows the suffix. The file has no
    EXIF (no orientation tag): its pixels are stored upright, as they are shown."""

    arr = t if isinstance(t, np.ndarray) else tensor_to_uint8(t)
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    with atomic_path(path, overwrite=overwrite) as tmp:
        Image.fromarray(arr).save(tmp, format=fmt)
    return path


MAX_CROP_ASPECT = 16


def center_crop_arr(arr: np.ndarray, size: int) -> np.ndarray:
    """ADM center crop (guided-diffusion): box-halve while the short side >= 2*size, bicubic resize
    of the short side to `size`, then a center crop. This is the reference evaluation protocol.

    An image longer than MAX_CROP_ASPECT times its short side (a 1 x 20000 px strip) is first cut to its
    central part of that aspect, so that the resize stays small (it would be 256 x 5 million px there);
    the result is the protocol's up to the resampling of the border pixels."""
    h, w = arr.shape[:2]
    long_max = MAX_CROP_ASPECT * min(h, w)
    if max(h, w) > long_max:
        top, left = max(0, (h - long_max) // 2), max(0, (w - long_max) // 2)
        arr = arr[top : top + long_max, left : left + long_max]
    img = Image.fromarray(arr)
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    out = np.asarray(img)
    top = (out.shape[0] - size) // 2
    left = (out.shape[1] - size) // 2
    return out[top : top + size, left : left + size]


def make_grid(images: Iterable[torch.Tensor], nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """Tile 3xHxW tensors (same size) into one 3xH'xW' tensor, row-major."""
    images = [im if im.ndim == 3 else im[0] for im in images]
    if not images:
        raise ValueError("make_grid needs at least one image")
    c, h, w = images[0].shape
    n = len(images)
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for k, im in enumerate(images):
        r, col = divmod(k, ncol)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = im.detach().float().cpu()
    return grid


# Truncated JPEGs raise instead of loading half an image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False
