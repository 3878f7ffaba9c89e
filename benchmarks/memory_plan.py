"""The memory plan (dcae.runtime.memory) of the large text-to-image and class-conditional models, per GPU, for
the docs' table: `python benchmarks/memory_plan.py [--out benchmarks/results/memory_plan.md]`.

A plan, not a measurement: parameters, gradients, AdamW and EMA bytes are exact for these shapes; communication
buffers and activations are estimates (meta-device forward, fused attention; see dcae.runtime.memory). Latents
of DC-AE f32c32 (512 px -> 16 x 16, 1024 px -> 32 x 32), patch 1; SANA with Gemma-2-2B prompts (300 x 2304);
bf16 mixed precision, gradient checkpointing, 8 processes, one micro-batch per step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dcae.diffusion.conditioning import ClassConditioning, TextConditioning
from dcae.diffusion.train.plan import named_network_plan
from dcae.runtime.memory import GiB

MODELS = {"SANA-600M": TextConditioning(2304, 300), "SANA-1600M": TextConditioning(2304, 300),
          "SANA1.5-4800M": TextConditioning(2304, 300), "DiT-XL/1": ClassConditioning(1000)}  # fmt: skip
RESOLUTIONS = {512: 16, 1024: 32}  # px -> f32 latent size
DEVICE_GIB = 80  # an 80 GB H100 / A100


def rows(world: int, micro_batch: int, checkpointing: bool) -> list[dict]:
    out = []
    for name, cond in MODELS.items():
        for px, size in RESOLUTIONS.items():
            for strategy in ("ddp", "fsdp"):
                p = named_network_plan(name, (32, size, size), micro_batch, cond, strategy=strategy, world=world,
                                       mixed_precision="bf16", checkpointing=checkpointing,
                                       memory=DEVICE_GIB * GiB)  # fmt: skip
                out.append({"model": name, "px": px, "strategy": strategy, "world": world, "micro_batch": micro_batch,
                            "checkpointing": checkpointing, **{k: v for k, v in p.rows()}, "fits": p.fits})  # fmt: skip
    return out


def markdown(table: list[dict]) -> str:
    keys = ("model", "px", "strategy", "world", "micro_batch", "checkpointing", "fits")
    cols = [k for k in table[0] if k not in keys]
    head = "| model | px | strategy | " + " | ".join(c.replace(" (estimate)", "*") for c in cols) + " | fits 80 GB |"
    lines = [head, "|" + "---|" * (len(cols) + 4)]
    for r in table:
        gib = " | ".join(f"{r[c] / GiB:.1f}" for c in cols)
        fits = "yes" if r["fits"] else "no"
        lines.append(f"| {r['model']} | {r['px']} | {r['strategy']} x{r['world']} | {gib} | {fits} |")
    return "\n".join(lines)


def check() -> str:
    """The plan against measurements on the CPU (fp32, 1 process, micro-batch 8, 16 x 16 latents): the peak of
    the tensors a real forward + backward allocates (TensorMemoryTracker) vs the planned activations +
    gradients."""
    import torch

    from dcae.diffusion.nets import create_diffusion_model
    from dcae.diffusion.train.plan import plan_network
    from dcae.models.memory import TensorMemoryTracker

    cases = {"DiT-S/1 (depth 4, width 128)": ("DiT-S/1", dict(num_classes=10, depth=4, hidden_size=128, num_heads=4),
                                              ClassConditioning(10)),
             "SANA-tiny (64-wide prompts, 32 tokens)": ("SANA-tiny", dict(caption_channels=64, max_tokens=32),
                                                        TextConditioning(64, 32))}  # fmt: skip
    lines = ["| model | checkpointing | measured peak (MiB) | planned activations + gradients (MiB) | ratio |",
             "|---|---|---|---|---|"]  # fmt: skip
    for label, (name, kw, cond) in cases.items():
        for ck in (False, True):
            torch.manual_seed(0)
            model = create_diffusion_model(name, in_channels=8, input_size=16, **kw)
            model.grad_checkpointing = ck
            with TensorMemoryTracker() as tracker:
                model(torch.randn(8, 8, 16, 16), torch.rand(8), cond.random(8)).square().mean().backward()
            with torch.device("meta"):
                meta = create_diffusion_model(name, in_channels=8, input_size=16, **kw)
            p = plan_network(meta, 8, (8, 16, 16), cond, strategy="ddp", world=1, mixed_precision="no",
                             checkpointing=ck)  # fmt: skip
            planned = p.activations + p.gradients
            lines.append(f"| {label} | {'on' if ck else 'off'} | {tracker.peak / 2**20:.1f} | {planned / 2**20:.1f} | "
                         f"{tracker.peak / planned:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory_plan.md"))
    ap.add_argument("--world", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--check", action="store_true", help="also measure tiny models on the CPU against their plan")
    a = ap.parse_args()
    table = rows(a.world, a.micro_batch, not a.no_checkpointing)
    text = (f"Memory plan per GPU (GiB; * estimates), bf16, gradient checkpointing "
            f"{'off' if a.no_checkpointing else 'on'}, micro-batch {a.micro_batch} per GPU, {a.world} GPUs\n\n"
            + markdown(table) + "\n")  # fmt: skip
    if a.check:
        text += (
            "\nChecked on the CPU (fp32, micro-batch 8, 16 x 16 latents): the peak of the tensors a real forward "
            "+ backward allocates (dcae.models.memory.TensorMemoryTracker) against the plan\n\n" + check() + "\n"
        )
    print(text)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
