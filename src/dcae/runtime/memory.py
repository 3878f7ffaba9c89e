"""A memory plan before launch: what one training process will hold, from the real model's parameters, the
precision, the strategy (DDP or FSDP over N processes), the micro-batch and gradient checkpointing.

Exact (byte for byte what the tensors' storages hold after an optimizer step, on the process that holds most,
rank 0):
- parameters: fp32 master weights; FSDP: each tensor's dim-0 shard of ceil(rows / N) rows (FSDP2 pads the last
  ranks' shards to that size, rank 0's is never padded);
- gradients: fp32, trainable parameters only (sharded like the weights under FSDP);
- optimizer: AdamW's exp_avg and exp_avg_sq (like the gradients) and its 4-byte `step` per tensor;
- EMA: the fp32 shadow of the trainable weights (sharded under FSDP).

Estimated:
- activations: the bytes autograd saves for backward in one forward of the micro-batch, counted with
  torch.autograd.graph.saved_tensors_hooks on a copy of the network on the meta device (no memory, no compute)
  in the activation dtype (bf16 under mixed precision); with gradient checkpointing, only each unit's inputs
  are kept, plus one unit recomputed during backward. Allocator fragmentation, temporary buffers and
  autocast's cached bf16 weight copies (DDP: 2 bytes per parameter) are not in it;
- communication: FSDP's gathered units (the root's parameters, the current and the prefetched unit in the
  parameter dtype, and one unit's full gradients in fp32; without reshard_after_forward every unit stays
  gathered from forward to backward; with accumulation the unsharded gradients of every unit are kept between
  micro-batches), DDP's all-reduce buckets (one fp32 copy of the gradients when N > 1).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

GiB = 1024**3
FP32 = 4
ADAM_MOMENTS = 2


@dataclass
class MemoryPlan:
    """Bytes per process (rank 0, the largest), and the device's memory when known."""

    strategy: str
    world: int
    micro_batch: int
    parameters: int
    gradients: int
    optimizer: int
    ema: int
    communication: int
    activations: int
    device_memory: int | None = None
    detail: str = ""  # precision and checkpointing, for the heading

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.ema + self.communication + self.activations

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters (fp32)", self.parameters), ("gradients (fp32)", self.gradients),
                ("optimizer (AdamW)", self.optimizer), ("EMA (fp32)", self.ema),
                ("communication (estimate)", self.communication), ("activations (estimate)", self.activations),
                ("total", self.total)]  # fmt: skip

    def describe(self) -> str:
        """The plan as lines of text (printed at the start of training and by `--plan`)."""
        head = (f"memory plan per process ({self.strategy}, {self.world} process(es), micro-batch "
                f"{self.micro_batch}{', ' + self.detail if self.detail else ''}):")  # fmt: skip
        lines = [head, *(f"  {name:<26}{size(n):>12}" for name, n in self.rows())]
        if self.device_memory is None:
            lines.append("  device memory unknown (no GPU here): fits is not checked")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} in {self.device_memory / GiB:.1f} GiB of device memory")
        return "\n".join(lines)


def size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 2**20:.2f} MiB"


def shard_numel(p: torch.Tensor, world: int) -> int:
    """Elements of rank 0's FSDP2 shard of `p` (dim 0 split into ceil(rows / world) rows)."""
    if p.ndim == 0:
        return 1
    return math.ceil(p.shape[0] / world) * (p.numel() // p.shape[0]) if p.shape[0] else 0


def state_bytes(model: nn.Module, strategy: str, world: int) -> dict[str, int]:
    """parameters, gradients, optimizer (AdamW) and EMA bytes of rank 0 (exact; see the module's note)."""
    n = world if strategy == "fsdp" else 1
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(shard_numel(p, n) for p in params) * FP32
    grads = sum(shard_numel(p, n) for p in trainable) * FP32
    return {"parameters": weights, "gradients": grads, "optimizer": ADAM_MOMENTS * grads + FP32 * len(trainable),
            "ema": grads}  # fmt: skip


def communication_bytes(model: nn.Module, units: list[nn.Module], strategy: str, world: int, param_bytes: int,
                        reshard_after_forward: bool, grad_accum: int) -> int:  # fmt: skip
    """FSDP's gathered units or DDP's buckets (an estimate; see the module's note)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if strategy != "fsdp":
        return trainable * FP32 if world > 1 else 0
    in_units = {id(p) for u in units for p in u.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    everything = sum(p.numel() for p in model.parameters())
    gathered = root + (everything - root if not reshard_after_forward else 2 * largest)
    grads = trainable * FP32 if grad_accum > 1 else largest * FP32
    return gathered * param_bytes + grads


@contextlib.contextmanager
def _fused_attention():
    """On the meta device scaled_dot_product_attention takes the math path, which saves the whole attention
    matrix; the fused kernels that run on GPUs (and CPUs) save q, k, v, the output and the log-sum-exp only.
    Meanwhile, the meta forward calls the CPU flash kernel's op (it has shape rules), which saves those."""
    original = F.scaled_dot_product_attention

    def fused(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        return flash(q, k, v, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def activation_bytes(model: nn.Module, inputs: tuple, units: list[nn.Module], checkpointing: bool) -> tuple[int, int]:
    """(kept, recomputed): the bytes autograd saves for backward in `model(*inputs)` and holds at the end of the
    forward (parameters excluded, each storage once), and what backward adds on top at its peak: with
    `checkpointing`, kept is what is saved outside the units plus the units' inputs, and recomputed the largest
    unit's own saved tensors (rebuilt during backward); without, 0. Run it on a meta-device copy (shapes only)."""
    seen: set[int] = set()
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    inside: list[int | None] = [None]
    per_unit = [0] * len(units)
    unit_inputs: dict[int, int] = {}
    outside = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in params and key not in seen:
            seen.add(key)
            if inside[0] is None:
                outside[0] += storage.nbytes()
            else:
                per_unit[inside[0]] += storage.nbytes()
        return t

    def enter(i: int):
        def hook(_module, args):
            inside[0] = i
            for a in args:
                if isinstance(a, torch.Tensor):
                    unit_inputs.setdefault(a.untyped_storage()._cdata, a.untyped_storage().nbytes())

        return hook

    def leave(_module, _args, _out):
        inside[0] = None

    handles = [h for i, u in enumerate(units) for h in (u.register_forward_pre_hook(enter(i)),
                                                           u.register_forward_hook(leave))]  # fmt: skip
    was = getattr(model, "grad_checkpointing", False)
    model.grad_checkpointing = False  # count what each unit saves; checkpointing is applied below
    try:
        with torch.enable_grad(), _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()
            model(*inputs)
    finally:
        model.grad_checkpointing = was
        for h in handles:
            h.remove()
    if not checkpointing:
        return outside[0] + sum(per_unit), 0
    return outside[0] + sum(unit_inputs.values()), max(per_unit, default=0)


def device_memory() -> int | None:
    """Total memory of this process's GPU, or None without one."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def plan(model: nn.Module, units: list[nn.Module], inputs: tuple, *, strategy: str, world: int,
         micro_batch: int, mixed_precision: str, checkpointing: bool, reshard_after_forward: bool = True,
         grad_accum: int = 1, memory: int | None = None) -> MemoryPlan:  # fmt: skip
    """The plan for `model` (a meta-device copy of the fp32 network is enough; its inputs on the meta device
    in the activation dtype, for one micro-batch of this process)."""
    param_bytes = 2 if mixed_precision in ("bf16", "fp16") else FP32
    state = state_bytes(model, strategy, world)
    comm = communication_bytes(model, units, strategy, world, param_bytes, reshard_after_forward, grad_accum)
    act_model = model.to(torch.bfloat16) if param_bytes == 2 else model
    kept, recomputed = activation_bytes(act_model, inputs, units, checkpointing)
    memory = memory if memory is not None else device_memory()
    return MemoryPlan(strategy, world, micro_batch, state["parameters"], state["gradients"], state["optimizer"],
                      state["ema"], comm, kept + recomputed, memory,
                      f"{mixed_precision}, gradient checkpointing {'on' if checkpointing else 'off'}")  # fmt: skip


def measured_state_bytes(model: nn.Module, opt: torch.optim.Optimizer, ema_shadow: dict[str, torch.Tensor]) -> dict:
    """What this process's parameters, gradients, optimizer state and EMA hold (each storage counted once, local
    shards of DTensors): the measurement `state_bytes` is checked against."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t._local_tensor if isinstance(t, DTensor) else t

    def total(tensors) -> int:
        storages = {}
        for t in tensors:
            s = local(t).untyped_storage()
            storages[s._cdata] = s.nbytes()
        return sum(storages.values())

    params = list(model.parameters())
    moments = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {"parameters": total(params), "gradients": total(p.grad for p in params if p.grad is not None),
            "optimizer": total(moments), "ema": total(ema_shadow.values())}  # fmt: skip
