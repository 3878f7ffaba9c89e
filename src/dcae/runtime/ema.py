"""The exponential moving average of a model's trainable weights, kept in fp32."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class EMA:
    """shadow <- shadow + (1 - d) (param - shadow) after every optimizer step. With `warmup` the decay of the
    k-th update is min(decay, (1 + k) / (10 + k)), so that a short run is not dominated by its initial weights."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    def current_decay(self) -> float:
        k = self.num_updates
        return min(self.decay, (1 + k) / (10 + k)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        params = dict(model.named_parameters())
        names = list(self.shadow)
        torch._foreach_lerp_([self.shadow[n] for n in names], [params[n].detach().float() for n in names],
                             1.0 - self.current_decay())  # fmt: skip

    def to(self, device: torch.device | str) -> EMA:
        self.shadow = {k: v.to(device) for k, v in self.shadow.items()}
        return self

    def state_dict_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's full state dict (buffers included) with the averaged parameters swapped in."""
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for name, s in self.shadow.items():
            sd[name] = s.to(sd[name].dtype)
        return sd

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Our own state, or a model state dict of averaged weights (then `num_updates` must be set by the caller)."""
        shadow = state["shadow"] if "shadow" in state and "num_updates" in state else state
        missing = sorted(set(self.shadow) - set(shadow))
        if missing:
            raise ValueError(f"EMA state does not match the trainable parameters (missing {missing[:3]})")
        if "num_updates" in state:
            self.num_updates = int(state["num_updates"])
        for name, s in self.shadow.items():
            s.copy_(shadow[name])
