"""Loading and saving DC-AE models: `load_dcae` / `save_dcae`, which `DCAE.from_pretrained` /
`DCAE.save_pretrained` also do (the first then checks the weights for NaN/Inf).

The formats and their helpers live in `dcae.models.weights` (re-exported here), which knows
configurations but not the model class; this module binds them to `DCAE`. Formats, detected automatically:
- original (`mit-han-lab/dc-ae-*`): `config.json` = {"model_name": ...} (ours adds "dcae_config" for
  user-defined shapes) + `model.safetensors`;
- diffusers (`mit-han-lab/dc-ae-*-diffusers`): AutoencoderDC `config.json` +
  `diffusion_pytorch_model.safetensors`, possibly sharded with an `.index.json`;
- a single `.safetensors` / `.pt` / `.pth` file in either key scheme, including the reference training
  checkpoints (`{"state_dict": ..., "ema": ...}`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dcae.models import weights
from dcae.models.autoencoder import DCAE
from dcae.models.config import DCAEConfig
from dcae.models.weights import (  # noqa: F401 - the helpers, importable from here as before
    _HUB_ID,
    DIFFUSERS_WEIGHTS,
    ORIGINAL_WEIGHTS,
    WEIGHT_SUFFIXES,
    _config_from_json,
    _find_weights,
    _zoo_match,
    check_state_dict,
    hub_snapshot,
    key_scheme,
    read_sharded,
    read_state_dict,
    resolve_source,
    state_dict_problems,
)


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
