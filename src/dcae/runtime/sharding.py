"""Sharded data parallelism for the trainers: FSDP2 (`torch.distributed.fsdp.fully_shard`) and the sharded
checkpoints it writes with torch.distributed.checkpoint (DCP).

Under `parallel.strategy: fsdp` every process holds 1/N of the fp32 weights, gradients, AdamW moments and EMA.
Each unit (a transformer block, an autoencoder stage) is all-gathered just before its forward and backward and
freed after; gradients are reduce-scattered. accelerate still launches the processes, sets the device and the
process group, but the sharding is applied here, with torch's own API: accelerate 1.16 wraps CPU processes in
DDP even with an FSDP plugin, while `fully_shard` and DCP run the same code under gloo (CPU) and NCCL (GPU), so
the path the tests check on the CPU is the one a GPU cluster runs.

Mixed precision bf16: MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32), fp32 master weights stay
sharded, each unit is gathered in bf16 and gradients are reduced in fp32 (the reference SANA and DC-Gen
setting); the trainer's autocast stays on around the loss.

A sharded checkpoint is a folder `step_XXXXXXX/` (the same name as a `.pt` checkpoint without the suffix):
DCP's files for the model, the optimizer (keyed by parameter name) and the EMA (local shards), plus `meta.pt`
(step, every rank's RNG, config, and what the trainer adds). It is written to `.step_XXXXXXX.tmp/` and renamed
when complete, so a kill leaves either the whole folder or none. DCP reshards on load: a checkpoint of N
processes resumes on M. Each process restores the RNG state its rank saved, and rank r >= N the state of rank
0; the trainers draw their noise from generators seeded by (seed, step, slot), and their data order from the
step, so what a resumed run computes does not depend on these states.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dcae.errors import UserError, brief
from dcae.runtime import checkpoint as ckpt
from dcae.utils.io import atomic_torch_save

META = "meta.pt"  # the small file of a sharded checkpoint that is not DCP's
PARTS = ("model", "optimizer", "ema")  # what DCP holds


# ----------------------------------------------------------------------------- process group
_OWN_GROUP = False  # True while a 1-process group made by ensure_process_group exists


def ensure_process_group(device: torch.device) -> None:
    """fully_shard and DCP need a process group; a run started without a launcher has none, so it gets a
    group of one (the same code path as N processes: one checkpoint format, one update)."""
    global _OWN_GROUP
    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    _OWN_GROUP = True


def release_process_group() -> None:
    """At the end of training: every process waits for the others, then the process group is destroyed (ours
    or the launcher's). A gloo group left to the interpreter's exit can abort a process that has finished its
    work ("terminate called without an active exception"), failing a complete run."""
    global _OWN_GROUP
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _OWN_GROUP = False


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- sharding
def shard(model: nn.Module, units: list[nn.Module], mixed_precision: str, reshard_after_forward: bool,
          device: torch.device) -> nn.Module:  # fmt: skip
    """fully_shard each unit, then the root (which owns what is left: embeddings, final layer). In place; the
    parameters become DTensors, so the optimizer and the EMA must be built after this."""
    ensure_process_group(device)
    if not units:
        raise UserError(f"parallel.strategy=fsdp: {type(model).__name__} has no units to shard")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision == "bf16" \
        else MixedPrecisionPolicy()  # fmt: skip
    model.to(device)
    with torch.no_grad():  # every rank starts from rank 0's weights, as DDP does (each rank seeded its own init)
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t, src=0)
    for unit in units:
        fully_shard(unit, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of an unsharded model on the meta device (no storage: nothing is copied), the `template` of
    `full_model`: structure, parameter names and requires_grad as the model's."""
    memo: dict[int, Any] = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
                            for p in model.parameters()}  # fmt: skip
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def no_sync(model: nn.Module):
    """Accumulate gradients without reduce-scatter (a non-final micro-batch)."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over DTensor gradients (the norm is reduced over the shards); a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor from a DTensor (a collective: every rank calls it), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def full_model(template: nn.Module, model: nn.Module, params: dict[str, torch.Tensor], main: bool,
               device: torch.device) -> nn.Module | None:  # fmt: skip
    """An unsharded copy of `model` on rank 0 (None elsewhere; `template`: the network on the meta device) whose
    parameters are `params` (e.g. the EMA shadow; the model's own for the others) and whose buffers are the
    model's. Gathered one tensor at a time, so besides the copy no rank holds more than one full tensor; every
    rank must call it."""
    net = copy.deepcopy(template).to_empty(device=device) if main else None
    target = dict(net.named_parameters()) if main else {}
    for name, p in model.named_parameters():
        full = full_tensor(params.get(name, p).detach())
        if main:
            target[name].copy_(full)
    if main:
        buffers = dict(net.named_buffers())
        for name, b in model.named_buffers():  # not sharded: every rank holds them whole
            buffers[name].copy_(b)
    return net


# ----------------------------------------------------------------------------- checkpoints
def is_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def _dcp_state(model: nn.Module, opt: torch.optim.Optimizer, shadow: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What DCP saves and loads in place: the model's and optimizer's sharded state dicts (the optimizer keyed by
    parameter name, so it reshards and survives a different world size) and the EMA's local shards."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optimizer": osd, "ema": dict(shadow)}


def save(path: Path, model: nn.Module, opt: torch.optim.Optimizer, shadow: dict[str, torch.Tensor],
         meta: dict[str, Any], keep_last: int, main: bool) -> Path:  # fmt: skip
    """Write the sharded checkpoint folder `path` atomically (all ranks call it), then keep the newest
    `keep_last` checkpoints of its folder. `meta`: what rank 0 writes beside DCP's files (step, RNG, config)."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp"
    if main:
        for stale in path.parent.glob(".step_*.tmp"):  # saves a kill interrupted: never valid checkpoints
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    dcp.save(_dcp_state(model, opt, shadow), checkpoint_id=tmp)
    if main:
        names = [n for n, _ in model.named_parameters()]  # the optimizer's parameter order, for consolidate
        atomic_torch_save({**meta, "param_names": names}, tmp / META)
        if path.exists():
            ckpt.remove_checkpoint(path)
        tmp.rename(path)
        for old in ckpt.list_checkpoints(path.parent)[:-keep_last]:
            ckpt.remove_checkpoint(old)
    barrier()
    return path


def load_checkpoint(path: str | Path, optimizer: bool = True) -> dict[str, Any]:
    """A checkpoint file, or a sharded checkpoint's folder consolidated on the CPU (optimizer=False: without
    the AdamW moments, for sampling and export)."""
    if not Path(path).is_dir():
        return ckpt.load_checkpoint(path)
    if not is_checkpoint(path):
        raise UserError(f"cannot read training checkpoint {path}: a folder without {META}")
    return consolidated(path, optimizer)


def load_meta(path: Path) -> dict[str, Any]:
    return ckpt.load_checkpoint(Path(path) / META)


def load(path: Path, model: nn.Module, opt: torch.optim.Optimizer, shadow: dict[str, torch.Tensor]) -> None:
    """Put a sharded checkpoint back into a model (sharded or not), its optimizer and the EMA shadow, resharded
    to this run's processes (all ranks call it)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _dcp_state(model, opt, shadow)
    dcp.load(state, checkpoint_id=Path(path))  # in place (the EMA shadow too), resharded to this run's DTensors
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def consolidated(path: str | Path, optimizer: bool = True) -> dict[str, Any]:
    """A sharded checkpoint as the trainers' ordinary checkpoint dict (full tensors, on the CPU, in this one
    process: no GPU and no process group needed): model, ema (the model's state dict with the averaged
    parameters), optimizer (torch's layout, parameters by index), and meta.pt's fields. optimizer=False skips
    the optimizer's moments (two thirds of the bytes) for a checkpoint that samples and exports but does not
    resume."""
    # format_utils.dcp_to_torch_save's way: a planner that builds the state dict from DCP's metadata
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    path = Path(path)
    meta = load_meta(path)
    keys = list(PARTS if optimizer else ("model", "ema"))
    state: dict[str, Any] = {}
    try:
        _load_state_dict(state, FileSystemReader(path), planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
        model = state["model"]
        ema = {**model, **{k: v.to(model[k].dtype) for k, v in state["ema"].items()}}
        out = {**{k: v for k, v in meta.items() if k != "param_names"}, "model": model, "ema": ema}
        if optimizer:
            out["optimizer"] = optimizer_by_index(state["optimizer"], meta["param_names"])
    except (KeyError, RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"{path}: damaged sharded checkpoint ({type(exc).__name__}: {brief(exc)})") from None
    return out


def optimizer_by_index(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """DCP's optimizer state dict (parameters by name) in torch's own layout (parameters by their index in
    model.parameters()), as Optimizer.load_state_dict reads it."""
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: dict(s) for n, s in osd["state"].items()}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}


def consolidate(path: str | Path, out: str | Path, optimizer: bool = True) -> Path:
    """Write `consolidated(path)` as one ordinary checkpoint file `out` (atomically)."""
    return atomic_torch_save(consolidated(path, optimizer), out)


def load_full(model: nn.Module, opt: torch.optim.Optimizer, shadow: dict[str, torch.Tensor],
              state: dict[str, Any]) -> None:  # fmt: skip
    """Put an ordinary (full) checkpoint's model, optimizer and EMA into a sharded model, its optimizer and EMA
    shadow: a DDP run continued under FSDP. Every rank reads the file and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=full)
    names = [n for n, _ in model.named_parameters()]
    set_optimizer_state_dict(model, opt, optimizer_by_name(state["optimizer"], names), options=full)
    ema = state["ema"].get("shadow", state["ema"])  # our EMA state, or the model's state dict with its weights
    with torch.no_grad():
        for name, s in shadow.items():
            value = ema[name].to(s.dtype)
            s.copy_(distribute_tensor(value, s.device_mesh, s.placements) if isinstance(s, DTensor) else value)


def optimizer_by_name(osd: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch's optimizer state dict (parameters by index) keyed by parameter name, as DCP's state dicts are."""
    state = {names[i]: s for i, s in osd["state"].items()}
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
    return {"state": state, "param_groups": groups}
