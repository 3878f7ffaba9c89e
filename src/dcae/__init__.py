"""dcae: Deep Compression Autoencoders for efficient high-resolution diffusion models.

The package's names (`DCAE`, `DCAEConfig`, ...) load on first use, so that `dcae --help` and the command
parsers do not import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
_LAZY = {"DCAE": "dcae.models", "DCAEConfig": "dcae.models", "get_config": "dcae.models", "list_models": "dcae.models"}

if TYPE_CHECKING:
    from dcae.models import DCAE, DCAEConfig, get_config, list_models


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcae' has no attribute {name!r}")


def create_model(name_or_config) -> DCAE:
    """A randomly initialised DC-AE from a zoo name, a DCAEConfig or a config file."""
    from dcae.models import DCAE

    return DCAE.from_config(name_or_config)


__all__ = ["DCAE", "DCAEConfig", "create_model", "get_config", "list_models", "__version__"]
