"""Throughput of one diffusion transformer on the latents of different autoencoders (DC-AE paper, Table 3).

For 512 px images: SD-VAE-f8 latents 4x64x64 with patch 2 (1024 tokens), DC-AE-f32 32x16x16 with patch 1
(256 tokens), DC-AE-f64 128x8x8 with patch 1 (64 tokens). The transformer is the same in all three; only
its patch embedding and output layer change with the latent shape. Training = forward + flow-matching loss
+ backward + AdamW step; inference = one network evaluation. With `generate_steps` N, also the whole
generation of an image: 2N network evaluations (classifier-free guidance) plus the autoencoder's decode of
the latent to 512 px, each autoencoder as diffusers implements it (AutoencoderKL for SD-VAE, AutoencoderDC
for DC-AE; random weights, same framework for all three), so the ratio shows what the user sees.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dcae.diffusion.nets import create_diffusion_model
from dcae.diffusion.processes.flow import FlowMatching
from dcae.utils.devices import match_inductor_to_aten_isa


@dataclass(frozen=True)
class Setting:
    name: str
    channels: int
    size: int
    patch: int

    @property
    def tokens(self) -> int:
        return (self.size // self.patch) ** 2


SETTINGS = (
    Setting("sd-vae-f8-p2", 4, 64, 2),
    Setting("dc-ae-f32-p1", 32, 16, 1),
    Setting("dc-ae-f64-p1", 128, 8, 1),
)


def sd_vae():
    """diffusers AutoencoderKL with Stable Diffusion's f8c4 architecture (random weights: for timing)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # a cast warning about an empty list of fp32 modules
    blocks = (128, 256, 512, 512)
    return AutoencoderKL(block_out_channels=blocks, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2)  # fmt: skip


def dc_ae(name: str):
    """diffusers AutoencoderDC of a zoo configuration (random weights: for timing)."""
    from dcae.bench import _diffusers_twin
    from dcae.models import DCAE

    return _diffusers_twin(DCAE.from_config(name))


# The autoencoder whose latents each setting models (its decoder runs once per generated image).
AUTOENCODERS = {
    "sd-vae-f8-p2": sd_vae,
    "dc-ae-f32-p1": lambda: dc_ae("dc-ae-f32c32-in-1.0"),
    "dc-ae-f64-p1": lambda: dc_ae("dc-ae-f64c128-in-1.0"),
}


def decode_img_s(build, setting: Setting, batch: int, device, dtype, warmup: int, steps: int) -> float:
    """Images per second of the autoencoder's decode of this setting's latents."""
    torch.manual_seed(0)
    ae = build().to(device, dtype).eval()
    z = torch.randn(batch, setting.channels, setting.size, setting.size, device=device, dtype=dtype)
    with torch.inference_mode():
        seconds = _timed(lambda: ae.decode(z), device, warmup, steps)
    return batch / seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds per call after `warmup` untimed calls (compilation, allocator warm-up). The median
    keeps a shared machine's hiccups out of the number."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def forward_flops(model: torch.nn.Module, setting: Setting, device: torch.device) -> float:
    """FLOPs (2 x MACs) of one forward pass for one image, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, setting.channels, setting.size, setting.size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, torch.full((1,), 500.0, device=device), torch.zeros(1, dtype=torch.long, device=device))
    return float(counter.get_total_flops())


def bench_one(
    model_name: str,
    setting: Setting,
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool = False,
    warmup: int = 2,
    steps: int = 5,
    overrides: dict | None = None,
) -> dict:
    family = model_name.split("/")[0]
    torch.manual_seed(0)
    model = create_diffusion_model(
        f"{family}/{setting.patch}", setting.channels, setting.size, num_classes=1000, **(overrides or {})
    ).to(device)
    params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, setting, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compile:
        match_inductor_to_aten_isa()
    run = torch.compile(model) if compile else model
    process = FlowMatching()
    x = torch.randn(batch, setting.channels, setting.size, setting.size, device=device)
    cond = model.conditioning.batch(torch.randint(0, 1000, (batch,), device=device), device)
    t = torch.full((batch,), 500.0, device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def train_step() -> None:
        with autocast:
            loss = process.loss(run, x, cond).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step() -> None:
        with autocast:
            run(x, t, cond)

    record = {
        "model": family + "".join(f" ({k} {v})" for k, v in (overrides or {}).items()),
        "setting": setting.name,
        "latent_shape": [setting.channels, setting.size, setting.size],
        "patch_size": setting.patch,
        "tokens": setting.tokens,
        "batch": batch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "compile": compile,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "params_m": round(params / 1e6, 2),
        "fwd_gflops_per_img": round(flops / 1e9, 2),
    }
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        model.train()
        s_train = _timed(train_step, device, warmup, steps)
        model.eval()
        s_infer = _timed(infer_step, device, warmup, steps)
    except torch.cuda.OutOfMemoryError:
        record.update(train_img_s=None, infer_img_s=None, error="out of memory")
        return record
    record["train_img_s"] = round(batch / s_train, 3)
    record["infer_img_s"] = round(batch / s_infer, 3)
    # Achieved model FLOP rate: training counts forward + backward as 3 forwards.
    record["train_tflops"] = round(3 * flops * batch / s_train / 1e12, 4)
    record["infer_tflops"] = round(flops * batch / s_infer / 1e12, 4)
    if device.type == "cuda":
        record["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return record


def run_bench(
    models: list[str],
    batch: int,
    device: torch.device,
    dtype: torch.dtype,
    compile: bool = False,
    warmup: int = 2,
    steps: int = 5,
    overrides: dict | None = None,
    settings: tuple[Setting, ...] = SETTINGS,
    log=print,
    generate_steps: int = 0,
    autoencoders: dict | None = None,
) -> list[dict]:
    """All settings for every model, each with its throughput ratio against the first (SD-VAE-f8) setting.
    generate_steps > 0 adds whole-image generation: that many CFG sampling steps plus the decode."""
    records = []
    decode = {}
    if generate_steps:  # one decode measurement per autoencoder, shared by all transformer models
        for s in settings:
            decode[s.name] = decode_img_s((autoencoders or AUTOENCODERS)[s.name], s, batch, device, dtype,
                                          warmup, steps)  # fmt: skip
            log(f"  decode {s.name:<14} {decode[s.name]:.3f} img/s")
    kinds = ("train", "infer", "generate") if generate_steps else ("train", "infer")
    for name in models:
        rows = []
        for s in settings:
            r = bench_one(name, s, batch, device, dtype, compile, warmup, steps, overrides)
            if generate_steps and r["infer_img_s"]:
                per_image = 2 * generate_steps / r["infer_img_s"] + 1 / decode[s.name]
                r.update(generate_steps=generate_steps, decode_img_s=round(decode[s.name], 3),
                         generate_img_s=round(1 / per_image, 4),
                         decode_share=round(1 / decode[s.name] / per_image, 3))  # fmt: skip
            rows.append(r)
            log(f"  {r['model']:<10} {s.name:<14} train {r['train_img_s']} img/s, infer {r['infer_img_s']} img/s")
        base = rows[0]
        for r in rows:
            for k in kinds:
                a, b = r.get(f"{k}_img_s"), base.get(f"{k}_img_s")
                r[f"{k}_ratio_vs_f8"] = round(a / b, 2) if a and b else None
        records += rows
    return records


def format_table(records: list[dict]) -> str:
    generate = any("generate_img_s" in r for r in records)
    head = "| model | setting | tokens | batch | GFLOP/img | train img/s | x f8 | infer img/s | x f8 |"
    if generate:
        head += " decode img/s | generate img/s | x f8 | decode share |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        line = (
            f"| {r['model']} | {r['setting']} | {r['tokens']} | {r['batch']} | {r['fwd_gflops_per_img']} | "
            f"{r['train_img_s']} | {r['train_ratio_vs_f8']} | {r['infer_img_s']} | {r['infer_ratio_vs_f8']} |"
        )
        if generate:
            line += (
                f" {r.get('decode_img_s')} | {r.get('generate_img_s')} | {r.get('generate_ratio_vs_f8')} |"
                f" {r.get('decode_share')} |"
            )
        lines.append(line)
    if generate:
        steps = next(r["generate_steps"] for r in records if "generate_steps" in r)
        lines.append(f"\ngenerate = {steps} sampling steps with classifier-free guidance (2 evaluations each) "
                     "+ one decode to 512 px (diffusers AutoencoderKL / AutoencoderDC)")  # fmt: skip
    return "\n".join(lines)


def main_from_args(args) -> int:
    from dcae.utils.io import atomic_write_json

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype, torch.bfloat16 if gpu else torch.float32)
    models = args.model or (["DiT-XL", "UViT-H"] if gpu else ["DiT-S"])
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    overrides = {"depth": args.depth} if args.depth else None
    records = run_bench(
        models,
        args.batch or (32 if gpu else 2),
        device,
        dtype,
        compile=args.compile,
        warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        steps=args.steps or (10 if gpu else 3),
        overrides=overrides,
        generate_steps=args.generate_steps,
    )
    print(format_table(records))
    if args.json:
        atomic_write_json(args.json, records)
        chart = plot_ratios(records, Path(args.json).with_suffix(".png"))
        print(f"wrote {args.json} and {chart}")
    return 0


def plot_ratios(records: list[dict], path: Path) -> Path:
    """Throughput relative to the f8 setting: one panel per model, bars for train, infer (and generate)."""
    from dcae.utils.plots import bar_chart

    settings = list(dict.fromkeys(r["setting"] for r in records))
    kinds = [k for k in ("train", "infer", "generate") if any(f"{k}_ratio_vs_f8" in r for r in records)]
    panels = {}
    for model in dict.fromkeys(r["model"] for r in records):
        rows = {r["setting"]: r for r in records if r["model"] == model}
        panels[model] = {k: [rows.get(s, {}).get(f"{k}_ratio_vs_f8") for s in settings] for k in kinds}
    r0 = records[0]
    return bar_chart(panels, settings, path, f"throughput vs SD-VAE f8 ({r0['device']}, {r0['dtype']})", "x f8")
