"""SANA LoRAs in diffusers' format, both ways.

`export_lora`: the adapters of one of our LoRA runs (EMA weights) as diffusers' `SanaLoraLoaderMixin` writes them:
`pytorch_lora_weights.safetensors` with peft's saved names under `transformer.` (`transformer.transformer_blocks.0
.attn1.to_q.lora_A.weight`) and the LoraConfig in the `lora_adapter_metadata` header, written by diffusers' own
`SanaPipeline.save_lora_weights`; so `SanaPipeline.load_lora_weights(folder)` loads it onto the base pipeline.

`load_lora`: a diffusers-format SANA LoRA (ours, or one from diffusers' train_dreambooth_lora_sana.py) onto our
transformer for `dcae t2i sample --lora PATH [--lora-scale S]`: read with diffusers' `lora_state_dict`, the
LoraConfig from the metadata or, without it, as diffusers infers it (`_create_lora_config`: ranks from the
shapes, alpha = rank), injected and loaded with peft. A LoRA whose layers the model lacks or whose shapes differ
is refused in one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dcae.diffusion.nets.sana import SanaTransformer
from dcae.diffusion.train import lora as lora_mod
from dcae.diffusion.train.checkpoint import load_checkpoint
from dcae.errors import UserError, brief
from dcae.utils.io import atomic_path

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
PREFIX = "transformer."


def export_lora(checkpoint_or_run: str | Path, folder: str | Path, overwrite: bool = False,
                use_ema: bool = True) -> Path:  # fmt: skip
    """Write `folder`/pytorch_lora_weights.safetensors from a LoRA run of ours; returns the file."""
    from diffusers import SanaPipeline

    model, _, meta = load_checkpoint(checkpoint_or_run, use_ema=use_ema)
    spec = meta["model_args"].get("lora")
    if not isinstance(model, SanaTransformer) or not spec:
        raise UserError(f"{meta['path']}: not a SANA LoRA run (train with finetune.lora.rank > 0); export the "
                        "whole pipeline without --lora")  # fmt: skip
    if spec.get("trainable"):
        raise UserError(f"{meta['path']}: also trains {', '.join(spec['trainable'])} fully, which a LoRA file "
                        "cannot hold; export the whole (merged) pipeline without --lora")  # fmt: skip
    path = Path(folder) / WEIGHT_NAME
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists (pass --overwrite to replace it)")
    layers = {k: v.contiguous() for k, v in lora_mod.lora_state_dict(model).items()}
    with atomic_path(path) as tmp:
        SanaPipeline.save_lora_weights(
            tmp.parent,
            transformer_lora_layers=layers,
            weight_name=tmp.name,
            transformer_lora_adapter_metadata=lora_mod.peft_config(spec).to_dict(),
        )
    return path


def read_lora(source: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(peft state dict without the `transformer.` prefix, LoraConfig kwargs or None) of a diffusers SANA LoRA:
    a .safetensors file or a folder holding one."""
    from diffusers import SanaPipeline

    path = Path(source)
    if not path.exists():
        raise UserError(f"--lora {source}: no such file or folder")
    kw = {"weight_name": path.name} if path.is_file() else {}
    where = path.parent if path.is_file() else path
    try:
        state, metadata = SanaPipeline.lora_state_dict(str(where), return_lora_metadata=True, local_files_only=True,
                                                       **kw)  # fmt: skip
    except Exception as exc:
        raise UserError(f"--lora {source}: not a readable diffusers LoRA ({brief(exc, 160)})") from None
    other = sorted({k.split(".")[0] for k in state if not k.startswith(PREFIX)})
    if other or not state:
        raise UserError(f"--lora {source}: not a SANA transformer LoRA (keys under {other or 'nothing'}, "
                        f"expected {PREFIX}...)")  # fmt: skip
    if any(".lora_A" not in k and ".lora_B" not in k for k in state):
        raise UserError(f"--lora {source}: keys that are not peft LoRA weights (lora_A / lora_B), e.g. "
                        f"{next(k for k in state if '.lora_' not in k)}")  # fmt: skip
    state = {k.removeprefix(PREFIX): v for k, v in state.items()}
    if metadata:
        metadata = {k.removeprefix(PREFIX): v for k, v in metadata.items() if k.startswith(PREFIX)} or None
    return state, metadata


def load_lora(model: torch.nn.Module, source: str | Path, scale: float = 1.0) -> torch.nn.Module:
    """Add the diffusers-format LoRA `source` to our SANA transformer (in place), its update scaled by `scale`."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    if lora_mod.has_lora(model):
        model = lora_mod.merge_lora(model)  # a LoRA run of ours: its own adapters first, folded in
    state, metadata = read_lora(source)
    modules = dict(model.named_modules())
    missing = sorted({k.split(".lora_")[0] for k in state} - set(modules))
    if missing:
        raise UserError(f"--lora {source}: adapts layers this {type(model).__name__} does not have (e.g. "
                        f"{missing[0]}): a LoRA for another architecture")  # fmt: skip
    for k, v in state.items():  # A: (r, in), B: (out, r): the layer's own sizes (a rank mismatch shows here)
        layer = modules[k.split(".lora_")[0]]
        w = getattr(layer, "weight", None)
        if w is None:
            continue
        want = w.shape[1] if ".lora_A" in k else w.shape[0]
        got = v.shape[1] if ".lora_A" in k else v.shape[0]
        if got != want:
            side = "inputs" if ".lora_A" in k else "outputs"
            raise UserError(f"--lora {source}: {k} is {tuple(v.shape)}, the layer has {want} {side}: a LoRA for "
                            "another architecture")  # fmt: skip
    rank = {f"^{k}": v.shape[1] for k, v in state.items() if "lora_B" in k and v.ndim > 1}
    try:
        config = _create_lora_config(state, None, metadata, rank, model_state_dict=model.state_dict(),
                                     adapter_name=lora_mod.ADAPTER)  # fmt: skip
        inject_adapter_in_model(config, model, adapter_name=lora_mod.ADAPTER)
        result = set_peft_model_state_dict(model, state, adapter_name=lora_mod.ADAPTER)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise UserError(f"--lora {source}: does not fit the model ({brief(exc, 200)})") from None
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise UserError(f"--lora {source}: weights the model has no place for, e.g. {unexpected[0]}")
    missing_ab = [k for k in (getattr(result, "missing_keys", None) or []) if ".lora_" in k]
    if missing_ab:
        raise UserError(f"--lora {source}: its config names layers it holds no weights for, e.g. {missing_ab[0]} "
                        "(rank or target modules differ from the weights)")  # fmt: skip
    if scale != 1.0:
        lora_mod.set_scale(model, scale)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
