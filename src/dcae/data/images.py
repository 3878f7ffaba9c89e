"""Image files <-> tensors in [-1, 1].

Everything that reads images (CLI, evaluation, training, latent extraction) goes through
`load_image`, so that grayscale, palette, RGBA and 16-bit files are handled in one place and
an unreadable file is reported by name.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from dcae.errors import ImageReadError  # defined there (cheap to import for everyone), raised here

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif")


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


def _decode(source, name: str) -> np.ndarray:
    """Animated files (GIF, WebP, APNG) give their first frame."""
    with _opened(source, name) as img:
        try:
            img.load()
            return _to_rgb_array(img)
        except Exception as exc:  # truncated or corrupt data, unknown modes
            raise ImageReadError(f"cannot read image {name}: {exc}") from exc


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) from the file's header, without decoding; the same checks and errors as
    `load_image_uint8` up to the pixel data (which may still turn out corrupt)."""
    with _opened(Path(path), str(path)) as img:
        return img.height, img.width


def load_image_uint8(path: str | os.PathLike, name: str | None = None) -> np.ndarray:
    """Read a file as HxWx3 uint8 RGB; raises ImageReadError naming the file (or `name`, when given;
    FileNotFoundError if it does not exist)."""
    return _decode(Path(path), str(path) if name is None else name)


def decode_image_bytes(data: bytes, name: str) -> np.ndarray:
    """Encoded image bytes (e.g. a tar member) -> HxWx3 uint8, converted like `load_image_uint8`;
    ImageReadError names `name` when they cannot be decoded."""
    return _decode(io.BytesIO(data), name)


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
    """Read an image file as a 3xHxW float32 tensor in [-1, 1]."""
    return uint8_to_tensor(load_image_uint8(path))


def save_image(t: torch.Tensor | np.ndarray, path: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write a [-1, 1] tensor (or uint8 array) atomically; the format follows the suffix."""
    from dcae.utils.io import atomic_path

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
