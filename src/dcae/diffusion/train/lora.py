"""LoRA (Hu et al. 2021) for the diffusion trainer, through peft: low-rank updates W + (alpha / r) B A on the
layers `target_modules` names, the base weights frozen.

peft's `inject_adapter_in_model` (what diffusers' own LoRA loading uses) adds the adapters in place, so the
network keeps its class and diffusers' key names (`...attn1.to_q.base_layer.weight`, `...to_q.lora_A.default.weight`):
a checkpoint of a LoRA run holds them all, and its `model_args["lora"]` (this module's `spec`) rebuilds the same
network. Only the adapters (and the modules `trainable` names, e.g. DC-Gen's new patch embedder and head) have
requires_grad, so the optimizer and the EMA (dcae.runtime.ema: trainable parameters only) hold just those.
"""

from __future__ import annotations

import fnmatch

import torch
from torch import nn

from dcae.errors import UserError

ADAPTER = "default"  # peft's adapter name


def spec(rank: int, alpha: float | None, dropout: float, target_modules, trainable=()) -> dict:
    """The record a checkpoint keeps in model_args["lora"] (plain types: it is compared on resume)."""
    return {"rank": int(rank), "alpha": float(alpha if alpha is not None else rank), "dropout": float(dropout),
            "target_modules": [str(t) for t in target_modules], "trainable": [str(t) for t in trainable]}  # fmt: skip


def spec_of(finetune) -> dict:
    """The spec of a config's `finetune:` section (FinetuneConfig)."""
    f = finetune
    return spec(f.lora.rank, f.lora.alpha, f.lora.dropout, f.lora.target_modules, f.trainable)


def peft_config(s: dict):
    from peft import LoraConfig

    return LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                      target_modules=list(s["target_modules"]), init_lora_weights=True)  # fmt: skip


def add_lora(model: nn.Module, s: dict) -> nn.Module:
    """Inject the adapters of spec `s` into `model` (in place) and freeze everything else but the modules
    `s["trainable"]` names (fnmatch patterns on module names). One line naming a target that matches no layer."""
    from peft import inject_adapter_in_model

    names = [n for n, _ in model.named_modules()]
    missing = [t for t in s["target_modules"] if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"finetune.lora.target_modules: no layer named {', '.join(missing)} in "
                        f"{type(model).__name__} (e.g. to_q, to_k, to_v, to_out.0, conv_inverted)")  # fmt: skip
    inject_adapter_in_model(peft_config(s), model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or _in_trainable(name, s.get("trainable", ())))
    return model


def train_only(model: nn.Module, patterns) -> None:
    """Freeze every weight but those of the modules `patterns` names and the LoRA adapters (if any)."""
    names = [n for n, _ in model.named_modules()]
    missing = [p for p in patterns if not any(fnmatch.fnmatch(n, p) or n == p for n in names)]
    if missing:
        raise UserError(f"finetune.trainable: no module named {', '.join(missing)} in {type(model).__name__} "
                        "(e.g. patch_embed, proj_out, transformer_blocks.*)")  # fmt: skip
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_" in name or _in_trainable(name, patterns))


def _in_trainable(param: str, patterns) -> bool:
    module = param.rsplit(".", 1)[0]
    return any(fnmatch.fnmatch(module, pat) or module.startswith(pat + ".") or module == pat for pat in patterns)


def has_lora(model: nn.Module) -> bool:
    return any(".lora_A." in n for n, _ in model.named_parameters())


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's saved names (`...to_q.lora_A.weight`): peft's get_peft_model_state_dict."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=ADAPTER)


def set_scale(model: nn.Module, scale: float) -> None:
    """Scale every adapter's update by `scale` (diffusers' `lora_scale`: peft's scale_layer on each LoRA layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            m.scale_layer(scale)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights with peft's own merge (W += scale B A) and put the plain layers
    back: the network of the pretrained layout, with the fine-tuned weights (in place; returned)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, m in list(model.named_modules()):
        if isinstance(m, BaseTunerLayer):
            m.merge(adapter_names=[ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.get_base_layer())
    for p in model.parameters():
        p.requires_grad_(True)
    return model
