"""The autoencoder: DC-AE's configurations, layers, model and weight formats, its fast paths and exact tiles, and
its commands. The package's names load on first use, so that the command parsers (`models.commands`) do not
import torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "DCAE": "dcae.models.autoencoder",
    "Decoder": "dcae.models.autoencoder",
    "Encoder": "dcae.models.autoencoder",
    "DCAEConfig": "dcae.models.config",
    "get_config": "dcae.models.config",
    "list_models": "dcae.models.config",
}

if TYPE_CHECKING:
    from dcae.models.autoencoder import DCAE, Decoder, Encoder
    from dcae.models.config import DCAEConfig, get_config, list_models


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dcae.models' has no attribute {name!r}")


__all__ = ["DCAE", "DCAEConfig", "Decoder", "Encoder", "get_config", "list_models"]
