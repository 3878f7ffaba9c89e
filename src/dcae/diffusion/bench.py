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
from torch.utils.flop_counter import FlopCounterMode

from dcae.diffusion.conditioning import Text
from dcae.diffusion.nets import create_diffusion_model
from dcae.diffusion.nets.registry import parse_model_name
from dcae.diffusion.processes.flow import FlowMatching
from dcae.diffusion.processes.sampling import sample
from dcae.models import DCAE
from dcae.models.bench import _diffusers_twin
from dcae.utils.devices import match_inductor_to_aten_isa
from dcae.utils.io import atomic_write_json
from dcae.utils.plots import bar_chart


@dataclass(frozen=True)
class Setting:
    name: str
    channels: int
    size: int
    patch: int
    resolution: int = 512  # image px

    @property
    def tokens(self) -> int:
        return (self.size // self.patch) ** 2


SETTINGS = (
    Setting("sd-vae-f8-p2", 4, 64, 2),
    Setting("dc-ae-f32-p1", 32, 16, 1),
    Setting("dc-ae-f64-p1", 128, 8, 1),
)  # at 512 px

# Sampling as SANA's pipeline does: flow DPM-Solver, guidance 4.5, time shift 3.
SAMPLE_SOLVER, SAMPLE_CFG, SAMPLE_SHIFT = "dpm++", 4.5, 3.0


def settings_at(resolution: int, settings: tuple[Setting, ...] = SETTINGS) -> tuple[Setting, ...]:
    """The settings (given at 512 px) for images of `resolution` px: each latent side scales with it."""
    if resolution % 64:
        raise ValueError(f"resolution {resolution} is not a multiple of 64 (the f64 latents' pixel size)")
    return tuple(
        Setting(s.name, s.channels, s.size * resolution // s.resolution, s.patch, resolution) for s in settings
    )


def model_overrides(
    name: str, depth: int | None = None, text_tokens: int | None = None, caption_channels: int | None = None
) -> dict | None:
    """Network overrides for a smaller run of the named model: `depth` is DiT / U-ViT's depth or SANA's
    num_layers; the text sizes (prompt tokens, caption channels) apply to text-to-image models only."""
    text = parse_model_name(name.split("/")[0] + "/1")[0] == "SANA"
    out = {}
    if depth:
        out["num_layers" if text else "depth"] = depth
    if text and text_tokens:
        out["max_tokens"] = text_tokens
    if text and caption_channels:
        out["caption_channels"] = caption_channels
    return out or None


def bench_condition(conditioning, batch: int, device: torch.device, generator: torch.Generator | None = None):
    """A random condition of the model's kind for `batch` images: class labels, or encoded prompts, or None."""
    return conditioning.random(batch, device, generator)


def condition_record(cond) -> dict:
    """What a record says about the condition it was timed with."""
    if isinstance(cond, Text):
        return {"kind": "text", "emb": list(cond.emb.shape), "mask": list(cond.mask.shape),
                "null_emb": list(cond.null_emb.shape)}  # fmt: skip
    if cond is None:
        return {"kind": "none"}
    return {"kind": "class", "num_classes": cond.num_classes}


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

    x = torch.randn(1, setting.channels, setting.size, setting.size, device=device)
    cond = bench_condition(model.conditioning, 1, device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, torch.full((1,), 500.0, device=device), cond)
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
    sample_steps: int = 0,
) -> dict:
    """One model on one setting: training and one-evaluation img/s; with `sample_steps` N also sampling img/s
    (N guided solver steps). Class-conditional families get 1000 classes; text-to-image ones random prompts."""
    family = model_name.split("/")[0]
    torch.manual_seed(0)
    model = create_diffusion_model(f"{family}/{setting.patch}", setting.channels, setting.size, **(overrides or {})).to(
        device
    )
    params = sum(p.numel() for p in model.parameters())
    flops = forward_flops(model, setting, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    if compile:
        match_inductor_to_aten_isa()
    run = torch.compile(model) if compile else model
    process = FlowMatching()
    x = torch.randn(batch, setting.channels, setting.size, setting.size, device=device)
    cond = bench_condition(model.conditioning, batch, device)
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

    def sample_step() -> None:
        with autocast:
            sample(run, process, x, cond, steps=sample_steps, solver=SAMPLE_SOLVER, cfg_scale=SAMPLE_CFG,
                   shift=SAMPLE_SHIFT)  # fmt: skip

    record = {
        "model": family + "".join(f" ({k} {v})" for k, v in (overrides or {}).items()),
        "setting": setting.name,
        "latent_shape": [setting.channels, setting.size, setting.size],
        "patch_size": setting.patch,
        "tokens": setting.tokens,
        "resolution": setting.resolution,
        "condition": condition_record(cond),
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
        # a whole sampling run is many evaluations: at most 3 timed runs (and 1 untimed) of it
        s_sample = _timed(sample_step, device, min(warmup, 1), min(steps, 3)) if sample_steps else None
    except torch.cuda.OutOfMemoryError:
        record.update(train_img_s=None, infer_img_s=None, error="out of memory")
        return record
    record["train_img_s"] = round(batch / s_train, 3)
    record["infer_img_s"] = round(batch / s_infer, 3)
    if s_sample:
        record.update(sample_steps=sample_steps, sample_cfg=SAMPLE_CFG, sample_img_s=round(batch / s_sample, 4))
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
    overrides=None,
    settings: tuple[Setting, ...] = SETTINGS,
    log=print,
    generate_steps: int = 0,
    autoencoders: dict | None = None,
    resolutions: tuple[int, ...] = (512,),
    sample_steps: int = 0,
) -> list[dict]:
    """All settings for every model and resolution, each with its throughput ratio against the first (SD-VAE-f8)
    setting of the same model and resolution. `overrides`: network overrides for every model, or a function of
    the model name (see model_overrides). generate_steps > 0 adds whole-image generation: that many CFG
    sampling steps plus the decode; sample_steps > 0 times guided sampling itself."""
    records = []
    decode = {}
    if generate_steps:  # one decode measurement per autoencoder, shared by all transformer models
        for res in resolutions:
            for s in settings_at(res, settings):
                decode[res, s.name] = decode_img_s((autoencoders or AUTOENCODERS)[s.name], s, batch, device, dtype,
                                                   warmup, steps)  # fmt: skip
                log(f"  decode {s.name:<14} {res} px {decode[res, s.name]:.3f} img/s")
    kinds = ["train", "infer"] + (["generate"] if generate_steps else []) + (["sample"] if sample_steps else [])
    for name in models:
        ov = overrides(name) if callable(overrides) else overrides
        for res in resolutions:
            rows = []
            for s in settings_at(res, settings):
                r = bench_one(name, s, batch, device, dtype, compile, warmup, steps, ov, sample_steps)
                if generate_steps and r["infer_img_s"]:
                    d = decode[res, s.name]
                    per_image = 2 * generate_steps / r["infer_img_s"] + 1 / d
                    r.update(
                        generate_steps=generate_steps,
                        decode_img_s=round(d, 3),
                        decode_share=round(1 / d / per_image, 3),
                        generate_img_s=round(1 / per_image, 4),
                    )
                rows.append(r)
                sampled = f", sample {r.get('sample_img_s')} img/s" if sample_steps else ""
                log(
                    f"  {r['model']:<10} {res} px {s.name:<14} train {r['train_img_s']} img/s, "
                    f"infer {r['infer_img_s']} img/s{sampled}"
                )
            base = rows[0]
            for r in rows:
                for k in kinds:
                    a, b = r.get(f"{k}_img_s"), base.get(f"{k}_img_s")
                    r[f"{k}_ratio_vs_f8"] = round(a / b, 2) if a and b else None
            records += rows
    return records


def format_table(records: list[dict]) -> str:
    generate = any("generate_img_s" in r for r in records)
    sampled = any("sample_img_s" in r for r in records)
    head = "| model | px | setting | tokens | batch | GFLOP/img | train img/s | x f8 | infer img/s | x f8 |"
    if sampled:
        head += " sample img/s | x f8 |"
    if generate:
        head += " decode img/s | generate img/s | x f8 | decode share |"
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        line = (
            f"| {r['model']} | {r.get('resolution', 512)} | {r['setting']} | {r['tokens']} | {r['batch']} | "
            f"{r['fwd_gflops_per_img']} | {r['train_img_s']} | {r['train_ratio_vs_f8']} | {r['infer_img_s']} | "
            f"{r['infer_ratio_vs_f8']} |"
        )
        if sampled:
            line += f" {r.get('sample_img_s')} | {r.get('sample_ratio_vs_f8')} |"
        if generate:
            line += (
                f" {r.get('decode_img_s')} | {r.get('generate_img_s')} | {r.get('generate_ratio_vs_f8')} |"
                f" {r.get('decode_share')} |"
            )
        lines.append(line)
    if sampled:
        r = next(r for r in records if "sample_steps" in r)
        lines.append(f"\nsample = {r['sample_steps']} flow {SAMPLE_SOLVER} steps with classifier-free guidance "
                     f"{r['sample_cfg']} (one network call on the doubled batch [cond; null] per step)")  # fmt: skip
    if generate:
        steps = next(r["generate_steps"] for r in records if "generate_steps" in r)
        lines.append(f"\ngenerate = {steps} sampling steps with classifier-free guidance (2 evaluations each) "
                     "+ one decode to the image (diffusers AutoencoderKL / AutoencoderDC)")  # fmt: skip
    return "\n".join(lines)


def main_from_args(args) -> int:

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
    for name in models:
        model_overrides(name)  # an unknown name fails here, before any timing
    text = any(parse_model_name(m.split("/")[0] + "/1")[0] == "SANA" for m in models)
    sample_steps = args.sample_steps if args.sample_steps is not None else ((20 if gpu else 2) if text else 0)

    def overrides(name: str) -> dict | None:
        return model_overrides(name, args.depth, args.text_tokens, args.caption_channels)

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
        resolutions=tuple(args.resolution),
        sample_steps=sample_steps,
    )
    print(format_table(records))
    if args.json:
        atomic_write_json(args.json, records)
        chart = plot_ratios(records, Path(args.json).with_suffix(".png"))
        print(f"wrote {args.json} and {chart}")
    return 0


def plot_ratios(records: list[dict], path: Path) -> Path:
    """Throughput relative to the f8 setting: one panel per model (and resolution), bars per kind."""

    settings = list(dict.fromkeys(r["setting"] for r in records))
    kinds = [k for k in ("train", "infer", "sample", "generate") if any(f"{k}_ratio_vs_f8" in r for r in records)]
    several = len({r.get("resolution", 512) for r in records}) > 1
    panels = {}
    for model, res in dict.fromkeys((r["model"], r.get("resolution", 512)) for r in records):
        rows = {r["setting"]: r for r in records if r["model"] == model and r.get("resolution", 512) == res}
        title = f"{model} {res} px" if several else model
        panels[title] = {k: [rows.get(s, {}).get(f"{k}_ratio_vs_f8") for s in settings] for k in kinds}
    r0 = records[0]
    return bar_chart(panels, settings, path, f"throughput vs SD-VAE f8 ({r0['device']}, {r0['dtype']})", "x f8")
