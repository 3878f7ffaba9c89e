"""Loading and saving DC-AE models: `load_dcae` / `save_dcae` (what `DCAE.from_pretrained` /
`DCAE.save_pretrained` do), `infer_config`. The formats (original, diffusers, single files, the Hub) are
`dcae.models.weights`, which knows configurations but not the model class; this module binds them to `DCAE`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dcae.models import weights
from dcae.models.autoencoder import DCAE
from dcae.models.config import DCAEConfig


def infer_config(state_dict: dict[str, torch.Tensor], source: str = "weights") -> DCAEConfig:
    """The zoo configuration whose key set and shapes match a single-file state dict.

    Several released models share shapes (in/mix, sana 1.0/1.1); where they also share the scaling
    factor any of them is right, otherwise the caller must say which one (`model_name=`).
    """
    return weights.infer_config(state_dict, source, model_class=DCAE)


def load_dcae(
    source: str | os.PathLike,
    model_name: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    prefer_ema: bool = False,
) -> DCAE:
    """Build the right DCAE for `source` and load its weights with strict key and shape checks."""
    return weights.load(DCAE, source, model_name, device, dtype, revision, prefer_ema)


def save_dcae(model: DCAE, directory: str | os.PathLike, format: str = "original", overwrite: bool = False) -> Path:
    """Write a loadable folder. Both files are written atomically; an existing folder with weights is
    refused unless `overwrite`."""
    return weights.save(model, directory, format=format, overwrite=overwrite)
