"""Our trainable U-ViT <-> the released DC-AE 1.5 layout (DC-Gen's USiT with `adaptive_channel`).

A U-ViT trained with augmented training (`augmented.channels`: adaptive channels) is the released DC-AE 1.5
structure at another size: the same modules, the same adaptive patch embedding and sliced head. The layouts
differ only in names: the released checkpoints prefix every key with `diffusion_model.` and keep the class table
under `label_emb.embedding_table.weight` (ours: `label_emb.weight`). `save_released` writes a folder that
`load_released` (and `dcae sample --model FOLDER`) reads: config.json with the release's name and the DC-Gen
config of this size, model.safetensors in the released key layout; `from_released` turns a loaded release into
our network (trainable, our layout) with the same outputs.

Only the weights and the structure carry over: the released USiT was trained with SiT's time convention (t in
[0, 1], 0 = noise, velocity data - noise) and our flow matching with t x 1000 (1000 = noise, velocity noise -
data), so a network trained here computes our velocity on our time scale under either layout.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from dcae.diffusion.c2i.released.models import PREFIX, ReleasedDiffusion, get_released
from dcae.diffusion.nets import UViT
from dcae.errors import UserError
from dcae.utils.io import atomic_save_safetensors, atomic_write_json

DCAE15_RELEASE = "dc-ae-f64c128-1.5-usit-2b-in-512px"  # the family (usit_dcae15) a saved folder names
_OURS, _RELEASED = "label_emb.weight", "label_emb.embedding_table.weight"


def dcgen_config(net: UViT) -> dict:
    """The DC-Gen pipeline config of our U-ViT (as `network_from_config` reads it)."""
    _check(net)
    return {"model": "uvit", "uvit": {
        "input_size": net.input_size, "patch_size": net.patch_size, "in_channels": net.in_channels,
        "hidden_size": net.hidden_size, "depth": 2 * len(net.in_blocks), "num_heads": net.mid_block.attn.num_heads,
        "mlp_ratio": net.mid_block.mlp.fc1.out_features / net.hidden_size, "num_classes": net.num_classes,
        "qkv_bias": net.mid_block.attn.qkv.bias is not None, "adaptive_channel": net.adaptive_channel,
    }}  # fmt: skip


def released_state_dict(net: UViT) -> dict[str, torch.Tensor]:
    """Our U-ViT's weights under the released keys."""
    return {PREFIX + (_RELEASED if k == _OURS else k): v for k, v in net.state_dict().items()}


def save_released(net: UViT, folder: str | os.PathLike, name: str = DCAE15_RELEASE) -> Path:
    """A released-layout folder (config.json + model.safetensors) for `load_released`."""
    folder = Path(folder)
    config = dcgen_config(net)
    release = get_released(name)
    if release.spec.backbone != "uvit" or release.spec.adaptive_channel != net.adaptive_channel:
        raise UserError(f"{name} is not a U-ViT with adaptive_channel={net.adaptive_channel}")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.detach().contiguous() for k, v in released_state_dict(net).items()},
                            folder / "model.safetensors")  # fmt: skip
    atomic_write_json(folder / "config.json", {"model_name": name, "config": config})
    return folder


def from_released(model: ReleasedDiffusion) -> UViT:
    """The released network as our trainable U-ViT (our key layout, same weights, same outputs)."""
    c = dcgen_config(model.diffusion_model)["uvit"]
    net = UViT(input_size=c["input_size"], patch_size=c["patch_size"], in_channels=c["in_channels"],
               hidden_size=c["hidden_size"], depth=c["depth"], num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"],
               num_classes=c["num_classes"], qkv_bias=c["qkv_bias"],
               adaptive_channel=c["adaptive_channel"])  # fmt: skip
    state = {(_OURS if k == _RELEASED else k): v for k, v in model.diffusion_model.state_dict().items()}
    net.load_state_dict(state)
    return net


def _check(net) -> None:
    """What the DC-Gen config can describe: a U-ViT without the options no release has."""
    if not isinstance(net, UViT):
        raise UserError(f"the released DC-AE 1.5 layout holds a U-ViT, not a {type(net).__name__}")
    if (
        net.learn_sigma
        or not isinstance(net.time_embed, torch.nn.Identity)
        or not isinstance(net.final_layer, torch.nn.Identity)
    ):
        raise UserError("the released layout has no learned variance, time MLP or final conv")
    if net.num_classes <= 0:
        raise UserError("the released layout is class-conditional: this U-ViT is unconditional")
