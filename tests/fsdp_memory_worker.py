"""One real FSDP step on each of `torchrun --nproc_per_node 2` processes (gloo), then the bytes its state holds
against the memory plan's: `python -m torch.distributed.run ... tests/fsdp_memory_worker.py OUT_DIR`.
Writes OUT_DIR/rank<r>.json: {"measured": {...}, "planned": {...}} (used by tests/test_fsdp.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dcae.diffusion.nets import create_diffusion_model, transformer_blocks
from dcae.runtime import memory, sharding
from dcae.runtime.ema import EMA

# Odd row counts (the class table has 3 rows) make FSDP2 pad rank 1's shards: the plan counts rank 0's.
ARGS = {"in_channels": 4, "input_size": 4, "num_classes": 2, "depth": 2, "hidden_size": 36, "num_heads": 2}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = create_diffusion_model("DiT-S/2", **ARGS)
    with torch.device("meta"):
        planned = memory.state_bytes(create_diffusion_model("DiT-S/2", **ARGS), "fsdp", world)
    sharding.shard(model, transformer_blocks(model), "bf16", True, torch.device("cpu"))
    ema = EMA(model, 0.99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 1])
    model(x, t, y).float().square().mean().backward()
    sharding.clip_grad_norm(model.parameters(), 1.0)
    opt.step()
    ema.update(model)
    measured = memory.measured_state_bytes(model, opt, ema.shadow)
    (out / f"rank{rank}.json").write_text(json.dumps({"measured": measured, "planned": planned}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
