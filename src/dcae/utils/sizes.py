"""Image sizes that cannot fit in memory, refused before any work: one estimate for every command that makes or
reads images of a size the user gives (`dcae t2i cache --resolution`, `dcae t2i sample --size`, `dcae latents
--resolution`, `dcae sample`, `dcae eval --resolution`, ...).

The estimate is a lower bound: a batch of B images of H x W pixels exists at least twice as float32 RGB (the
batch tensor and one conversion of it: decoded -> clamped, or read -> normalised), 2 x B x 3 x H x W x 4 bytes.
The autoencoder's own activations are not counted: above a tile's size it encodes and decodes in exact tiles
(dcae.models.tiling, and DCAE._run's check of the free memory), so they stay small whatever the image size.
A size is refused when that bound exceeds the machine's total RAM, or, on a CUDA device, the GPU's total memory:
a 100000 x 100000 image (240 GB as float32) is refused at once instead of being killed after a minute; 8K
(8192 x 8192: 1.6 GB per image) passes.

No torch at the top: the command parsers import this module; torch is imported only to ask a CUDA device.
"""

from __future__ import annotations

import os

from dcae.errors import UserError

COPIES = 2  # float32 copies of a batch that exist at once, at least


def image_batch_bytes(height: int, width: int, batch: int = 1, channels: int = 3) -> int:
    """The least memory a batch of `batch` images of `height` x `width` pixels needs: COPIES float32 copies."""
    return COPIES * batch * channels * 4 * height * width


def total_ram_bytes() -> int | None:
    """The machine's physical memory (None if the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        return None


def device_memory(device: str | None) -> list[tuple[str, int]]:
    """[(what, total bytes)] of the memories a batch on `device` must fit: RAM always, and the GPU's memory on a
    CUDA device ("auto" / None: CUDA when available, as dcae.utils.devices picks; under torchrun the process's
    LOCAL_RANK GPU). Memories that cannot be asked are left out."""
    found = []
    ram = total_ram_bytes()
    if ram:
        found.append(("RAM", ram))
    name = str(device or "auto").strip().lower()
    if name == "auto" or name.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                _, _, index = name.partition(":")
                index = int(index) if index else int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
                props = torch.cuda.get_device_properties(index)
                found.append((f"GPU memory of cuda:{index} ({props.name})", int(props.total_memory)))
        except Exception:  # no such device, no driver: the command's own device check names it
            pass
    return found


def check_images_fit(height: int, width: int, batch: int, device: str | None, what: str,
                     batch_option: str | None = "--batch-size") -> None:  # fmt: skip
    """Raise a one-line UserError, before any work, when `batch` images of `height` x `width` cannot fit in the
    memory of `device` (`image_batch_bytes` against `device_memory`). `what` names the option that set the size
    (e.g. "--size 100000x100000"); `batch_option` the option that sets the batch, named when batch > 1."""
    need = image_batch_bytes(height, width, batch)
    for where, total in device_memory(device):
        if need > total:
            if batch > 1:
                what = f"{what} with {batch_option} {batch}" if batch_option else what
                images, lower = f"a batch of {batch} images", f"; lower {batch_option}" if batch_option else ""
            else:
                images, lower = "one image", ""
            raise UserError(f"{what}: {images} of {height} x {width} px needs at least {_size(need)} of memory "
                            f"({COPIES} float32 copies), more than this machine's {_size(total)} of {where}"
                            f"{lower}")  # fmt: skip


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n < 2**40 else f"{n / 2**40:.1f} TiB"
