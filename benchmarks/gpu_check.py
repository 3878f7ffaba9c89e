"""One-shot GPU check of the fast path, tiling and the benchmark: run once on a CUDA machine.

    PYTHONPATH=src python benchmarks/gpu_check.py [--budget-s 480] [--out benchmarks/results]

Written on a machine without a GPU: nothing here has run on CUDA yet. It is ordered so that a cut-off
run still leaves its results: every section appends to the JSON as soon as it finishes.

1. environment (device, torch, Triton, diffusers versions);
2. correctness: Triton kernels vs PyTorch (fp32/bf16/fp16); full-size f32c32-in and sana-1.0 at 512 px:
   fast path (Triton, channels-last, folded BN) vs eager vs diffusers in fp32 (TF32 off) and bf16; fp16
   fast path incl. the overflow scan; exact tiling vs untiled at 2048 px, f128 sizes, 4096 px decode
   peak memory tiled vs untiled (the real allocator, bf16); CUDA graphs vs eager; compile vs eager;
3. the benchmark table (`dcae bench ae`): f32c32-in bf16 at 512/1024/2048/4096 (batch 16/4/1/1),
   dcae vs diffusers eager;
4. where the time goes (the issue asks for a profile wherever a goal is missed): the chip's measured
   bf16 matmul peak, each model's conv/matmul FLOPs per image, the fraction of the peak that dcae and
   diffusers reach at 512 px batch 16, and the top operators of one profiled decode and encode;
5. the compiled variants at 512 and 1024 while the budget lasts (compiling costs ~20-40 s per module
   and shape); then sana-1.0 eager if time remains;
6. if the budget still allows: which fast-path switches pay (cuDNN autotuning, Triton, channels-last,
   BN folding, channels-last weights, CUDA graphs), the data for choosing the defaults; then DiT-XL's
   throughput on f8 / f32 / f64 latents with whole-image generation (`dcae bench diffusion`).

Judging: the correctness sections are gates (bounds and reasons in gpu_gates.py); any failure, a section
that raised, or a fast path that fell back to the eager modules makes the script list the failures and
exit 1. The performance goals of the facts file are printed as met / missed / not measured and written to
goals_<device>_<date>.md; they do not change the exit code.

Expected time on one H100/H200: ~1.5 min of correctness, ~1 min of eager benchmark, ~1.5 min of profile
and variants, ~4 min of compiled benchmark: about 8.5 minutes; --budget-s stops starting new benchmark
configurations after that many seconds. Output: benchmarks/results/gpu_check_<device>_<date>.json (everything) and
ae_gpu_<device>_<date>.json/.md (benchmark records, same schema as `dcae bench ae`).

diffusers is needed for the comparisons; without it those parts are skipped (and say so). On a machine
without the package, carry this checkout's `.venv/lib/python3.11/site-packages/diffusers` along and add
its parent folder to PYTHONPATH.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from dcae import DCAE  # noqa: E402
from dcae.models import bench as B  # noqa: E402
from dcae.models import fast, fast_triton  # noqa: E402
from dcae.models.autoencoder import FastPathFallbackWarning  # noqa: E402
from dcae.models.layers import RMSNorm2d  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_gates  # noqa: E402

T0 = time.time()


class Ctx:
    """Device and sizes. `--dry-run` runs every code path on the CPU with a tiny model and 1/8 sizes, to
    catch Python-level mistakes before the one GPU run (numbers from a dry run mean nothing)."""

    dev = "cuda"
    div = 1  # sizes are divided by this
    model_names: dict[str, str] = {}
    backend = "inductor"
    # Benchmarks run in bf16 on the GPU; the dry run times fp32 at batch 1 with one repeat, because bf16
    # on a CPU without native bf16 is emulated and ~50x slower (the dry run checks code paths, not speed).
    bench_dtype, warmup, repeats = "bf16", 2, 5

    @classmethod
    def px(cls, n: int) -> int:
        return max(32, n // cls.div)

    @classmethod
    def batch(cls, n: int) -> int:
        return n if cls.dev == "cuda" else 1

    @classmethod
    def torch_dtype(cls) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[cls.bench_dtype]

    @classmethod
    def model(cls, name: str) -> str:
        return cls.model_names.get(name, name)


def empty_cache() -> None:
    if Ctx.dev == "cuda":
        torch.cuda.empty_cache()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) ** 2).mean().item()
    return 10 * math.log10(4 / max(mse, 1e-20))


class Report:
    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {"sections": {}}

    def add(self, section: str, value) -> None:
        self.data["sections"][section] = value
        self.data["elapsed_s"] = round(time.time() - T0, 1)
        self.path.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        print(f"[{time.time() - T0:6.1f}s] {section}: {json.dumps(value, default=str)[:600]}", flush=True)

    def guarded(self, section: str, fn) -> None:
        try:
            self.add(section, fn())
        except Exception as exc:  # keep going: one broken check must not hide the others
            self.add(section, {"error": repr(exc), "traceback": traceback.format_exc()[-2000:]})


def environment() -> dict:
    try:
        import diffusers

        dv = diffusers.__version__
    except ImportError:
        dv = None
    return {
        "device": torch.cuda.get_device_name() if Ctx.dev == "cuda" else "cpu (dry run)",
        "capability": torch.cuda.get_device_capability() if Ctx.dev == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": getattr(fast_triton.triton, "__version__", None),
        "triton_available": fast_triton.available(),
        "diffusers": dv,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }


def check_kernels() -> dict:
    out = {}
    if not fast_triton.available():
        return {"skipped": "Triton not available"}
    # The check a FastPath runs before using Triton (a failure there turns Triton off with a warning).
    out["fast_path_self_check"] = fast.check_kernels(fast_triton, torch.device(Ctx.dev)) or "ok"
    g = torch.Generator(device=Ctx.dev).manual_seed(0)
    # Odd sizes on purpose (masks at every block edge); the interpreter of the dry run gets small ones.
    c, h, w, heads = (512, 63, 47, 32) if Ctx.dev == "cuda" else (64, 9, 11, 2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).split(".")[-1]
        x = (torch.randn(4, c, h, w, device=Ctx.dev, generator=g) * 5).to(dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        norm = RMSNorm2d(c).to(Ctx.dev)
        out[f"rms_{name}"] = rel(fast_triton.rms_norm_channels_last(x, norm.weight, norm.bias, norm.eps), norm(x))
        qkv = torch.randn(2, 3 * 32 * heads, h, w, device=Ctx.dev, generator=g).to(dtype)
        t = qkv.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(2, h * w, heads, 96)
        ref = fast.relu_linear_attention_tokens(t, 32)
        out[f"attn_{name}"] = rel(fast_triton.relu_linear_attention_tokens(t, 32), ref)
    return out


def twin(model):
    try:
        return B._diffusers_twin(model)
    except ImportError:
        return None


def check_model(name: str) -> dict:
    """fp32 (TF32 off) and bf16: fast vs eager vs diffusers at 512 px, batch 2."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = DCAE.from_config(Ctx.model(name)).eval()
    peer = twin(model)
    model, peer = model.to(Ctx.dev), (peer.to(Ctx.dev) if peer is not None else None)
    x = torch.rand(2, 3, Ctx.px(512), Ctx.px(512), device=Ctx.dev) * 2 - 1
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        xs = x.to(dtype)
        with torch.inference_mode():
            model.disable_fast_path()
            z0 = model.encode(xs)
            y0 = model.decode(z0)
            model.enable_fast_path()
            z1, y1 = model.encode(xs), model.decode(z0)
            key = str(dtype).split(".")[-1]
            out[f"{key}_fast_vs_eager"] = {"enc": rel(z1, z0), "dec": rel(y1, y0)}
            if peer is not None:
                peer.to(dtype)
                out[f"{key}_fast_vs_diffusers"] = {"enc": rel(z1, peer.encode(xs).latent),
                                                   "dec": rel(y1, peer.decode(z0).sample)}  # fmt: skip
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # fp16: range scan on these (random-weight) images and the fast path with its plan.
    model.float()
    scan = fast.fp16_overflow_scan(model, x)
    out["fp16_scan_units_max"] = {k: round(v, 1) for k, v in scan["units"].items()}
    out["fp16_fp32_units"] = scan["fp32_units"]
    with torch.inference_mode():
        ref = model.decode(model.encode(x))
        model.half().enable_fast_path(fp32_units=scan["fp32_units"])
        y = model.decode(model.encode(x.half()))
    out["fp16_vs_fp32_recon"] = rel(y, ref)
    out["fp16_finite"] = bool(torch.isfinite(y).all())
    del model, peer
    empty_cache()
    return out


def check_tiling() -> dict:
    out = exact_tiling_fp32()
    torch.manual_seed(0)
    model = DCAE.from_config(Ctx.model("dc-ae-f32c32-in-1.0")).eval().to(Ctx.dev, torch.bfloat16)
    x = torch.rand(1, 3, Ctx.px(2048), Ctx.px(2048), device=Ctx.dev, dtype=torch.bfloat16) * 2 - 1
    with torch.inference_mode():
        ref = model.decode(model.encode(x))
        for mode in ("exact", "blend"):
            model.enable_tiling(tile_size=Ctx.px(1024), mode=mode)
            y = model.decode(model.encode(x))
            out[f"{mode}_2048_psnr_vs_untiled_random_weights"] = psnr(y, ref)
        model.disable_tiling()
        z = torch.randn(1, 32, Ctx.px(4096) // 32, Ctx.px(4096) // 32, device=Ctx.dev, dtype=torch.bfloat16)
        peaks = {}
        for mode in ("untiled", "exact", "blend"):
            if mode != "untiled":
                model.enable_tiling(tile_size=Ctx.px(1024), mode=mode)
            x4096 = torch.rand_like(x).repeat(1, 1, 2, 2)
            for what, fn, arg in (("dec", model.decode, z), ("enc", model.encode, x4096)):
                t = time.time()
                peaks[f"{mode}_{what}_4096_gib"] = round(B.peak_bytes(fn, arg, Ctx.dev) / 2**30, 3)
                peaks[f"{mode}_{what}_4096_s"] = round(time.time() - t, 3)
        out.update(peaks)
        out["dec_peak_ratio_exact"] = peaks["exact_dec_4096_gib"] / peaks["untiled_dec_4096_gib"]
    del model
    with torch.device("meta"):
        f128 = DCAE.from_config("dc-ae-f128c512-in-1.0").eval()
    f128.enable_tiling(tile_size=512, overlap=64)
    with torch.inference_mode():
        out["f128_1024_decode_shape"] = tuple(f128.decode(torch.empty(1, 512, 8, 8, device="meta")).shape)
    empty_cache()
    return out


def exact_tiling_fp32() -> dict:
    """The gate: exact tiles equal the untiled call to rounding (fp32, TF32 off, 2048 px in 1024 px tiles)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = DCAE.from_config(Ctx.model("dc-ae-f32c32-in-1.0")).eval().to(Ctx.dev)
    x = torch.rand(1, 3, Ctx.px(2048), Ctx.px(2048), device=Ctx.dev) * 2 - 1
    with torch.inference_mode():
        ref = model.decode(model.encode(x))
        model.enable_tiling(tile_size=Ctx.px(1024), mode="exact")
        y = model.decode(model.encode(x))
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    del model
    empty_cache()
    return {"exact_fp32_psnr_vs_untiled": psnr(y, ref), "exact_fp32_rel": rel(y, ref)}


def check_graphs_and_compile() -> dict:
    torch.manual_seed(0)
    model = DCAE.from_config(Ctx.model("dc-ae-f32c32-in-1.0")).eval().to(Ctx.dev, torch.bfloat16)
    x = torch.rand(1, 3, Ctx.px(512), Ctx.px(512), device=Ctx.dev, dtype=torch.bfloat16) * 2 - 1
    out = {}
    with torch.inference_mode():
        z = model.encode(x)
        y = model.decode(z)
        runs = [("eager", model.decode)]
        if Ctx.dev == "cuda":
            graphed = fast.GraphedDCAE(model)
            out["graph_enc_rel"], out["graph_dec_rel"] = rel(graphed.encode(x), z), rel(graphed.decode(z), y)
            runs.append(("graph", graphed.decode))
        for label, fn in runs:
            times = [B._timed(lambda f=fn: f(z), Ctx.dev) for _ in range(10)]
            out[f"{label}_dec_512_b1_ms"] = round(sorted(times)[5] * 1e3, 2)
        t = time.time()
        compiled = fast.compile_dcae(copy.deepcopy(model), backend=Ctx.backend)
        yc = compiled.decode(z.contiguous(memory_format=torch.channels_last))
        out["compile_first_call_s"] = round(time.time() - t, 1)
        out["compiled_dec_rel"] = rel(yc, y)
    empty_cache()
    return out


def matmul_peak_tflops() -> float:
    """Measured bf16 matmul throughput of this chip: the roof against which the models are judged."""
    n = 8192 if Ctx.dev == "cuda" else 512
    a = torch.randn(n, n, device=Ctx.dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=Ctx.dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = min(B._timed(lambda: [a @ b for _ in range(10)], Ctx.dev) for _ in range(3))
    return 2 * n**3 * 10 / t / 1e12


def count_flops(fn, arg) -> int:
    """Conv and matmul FLOPs of one call (elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(arg)
    return counter.get_total_flops()


def top_ops(fn, arg, n: int = 12) -> list[dict]:
    """The operators that take the most device time (self time) in one call, after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if Ctx.dev == "cuda" else [])
    with torch.inference_mode():
        fn(arg)
        B._sync(Ctx.dev)
        with profile(activities=activities) as prof:
            fn(arg)
            B._sync(Ctx.dev)
    key = "self_device_time_total" if Ctx.dev == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [
        {
            "op": e.key[:80],
            "calls": e.count,
            "ms": round(getattr(e, key) / 1e3, 3),
            "share": round(getattr(e, key) / total, 3),
        }
        for e in events[:n]
    ]


def profile_models() -> dict:
    """Fraction of the measured bf16 matmul peak reached at 512 px batch 16, and where the time goes."""
    peak = matmul_peak_tflops()
    out: dict = {"bf16_matmul_peak_tflops": round(peak, 1)}
    res, batch, dtype = Ctx.px(512), Ctx.batch(16), Ctx.torch_dtype()
    for name in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0"):
        torch.manual_seed(0)
        model = DCAE.from_config(Ctx.model(name)).eval()
        peer = twin(model)
        model = model.to(Ctx.dev, dtype)
        x = torch.rand(batch, 3, res, res, device=Ctx.dev, dtype=dtype) * 2 - 1
        with torch.inference_mode():
            z = model.encode(x)
        model.disable_fast_path()  # FLOPs of the model's math, whatever kernels the fast path swaps in
        flops = {"enc": count_flops(model.encode, x[:1]), "dec": count_flops(model.decode, z[:1])}
        model.enable_fast_path()
        entry: dict = {"gflop_per_image": {k: round(v / 1e9, 1) for k, v in flops.items()}}
        impls = [("dcae", model.encode, model.decode)]
        if peer is not None:
            peer = peer.to(Ctx.dev, dtype)
            impls.append(("diffusers", lambda t, p=peer: p.encode(t).latent, lambda t, p=peer: p.decode(t).sample))
        for impl, enc, dec in impls:
            speed = _enc_dec_img_s(enc, dec, x, z, batch)
            for what, fn, arg in (("enc", enc, x), ("dec", dec, z)):
                img_s = speed[f"{what}_img_s"]
                entry[f"{impl}_{what}_img_s"] = img_s
                entry[f"{impl}_{what}_peak_fraction"] = round(img_s * flops[what] / 1e12 / peak, 3)
                entry[f"{impl}_{what}_top_ops"] = top_ops(fn, arg)
        out[name] = entry
        del model, peer
        empty_cache()
    return out


def variants() -> dict:
    """Which fast-path switches pay on this chip: f32c32-in and sana-1.0, 512 px, batch 16, bf16, img/s of
    encode and decode for the default and each variant (the data for choosing the defaults)."""
    res, batch, dtype = Ctx.px(512), Ctx.batch(16), Ctx.torch_dtype()
    out: dict = {}
    for name in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0"):
        torch.manual_seed(0)
        model = DCAE.from_config(Ctx.model(name)).eval().to(Ctx.dev, dtype)
        x = torch.rand(batch, 3, res, res, device=Ctx.dev, dtype=dtype) * 2 - 1
        with torch.inference_mode():
            z = model.encode(x)
        setups = {
            "default": {},
            "cudnn_benchmark": {"cudnn_benchmark": True},
            "no_triton": {"triton": False},
            "no_channels_last": {"channels_last": False},
            "no_fold_bn": {"fold_bn": False},
        }
        entry: dict = {}
        for label, options in setups.items():
            model.enable_fast_path(**options)
            entry[label] = _enc_dec_img_s(model.encode, model.decode, x, z, batch)
        model.enable_fast_path()
        model.to(memory_format=torch.channels_last)  # weights stored channels-last too
        entry["channels_last_weights"] = _enc_dec_img_s(model.encode, model.decode, x, z, batch)
        if Ctx.dev == "cuda":
            graphed = fast.GraphedDCAE(model)
            entry["cuda_graphs"] = _enc_dec_img_s(graphed.encode, graphed.decode, x, z, batch)
        out[name] = entry
        del model
        empty_cache()
    return out


def _enc_dec_img_s(encode, decode, x, z, batch: int) -> dict:
    result = {}
    with torch.inference_mode():
        for what, fn, arg in (("enc", encode, x), ("dec", decode, z)):
            for _ in range(Ctx.warmup):
                fn(arg)
            times = sorted(B._timed(lambda f=fn, a=arg: f(a), Ctx.dev) for _ in range(Ctx.repeats))
            result[f"{what}_img_s"] = round(batch / times[len(times) // 2], 3)
    return result


def diffusion_throughput() -> list[dict]:
    """`dcae bench diffusion` on the chip: DiT-XL in bf16, batch 32, on f8-p2 / f32-p1 / f64-p1 latents, with
    whole-image generation (30 CFG steps + decode). The dry run uses a one-block DiT-S at batch 1 and no
    generation (full-size decoders take a minute on a CPU; tests/test_diffusion_bench.py covers that path)."""
    from dcae.diffusion.bench import format_table, run_bench

    gpu = Ctx.dev == "cuda"
    records = run_bench(["DiT-XL" if gpu else "DiT-S"], 32 if gpu else 1, torch.device(Ctx.dev),
                        torch.bfloat16 if gpu else torch.float32, warmup=3 if gpu else 0, steps=10 if gpu else 1,
                        overrides=None if gpu else {"depth": 1}, generate_steps=30 if gpu else 0)  # fmt: skip
    print(format_table(records), flush=True)
    return records


def diffusion_t2i_throughput() -> list[dict]:
    """`dcae bench diffusion --model SANA-1600M --resolution 512 1024`: the text-to-image transformer at full size
    (300 prompt tokens x 2304 channels) in bf16, batch 8, on f8-p2 / f32-p1 / f64-p1 latents, training, one
    evaluation and 5 guided sampling steps (doubled batch); few timed steps to keep it short. The dry run uses a
    one-layer SANA-tiny with 8 tokens x 16 channels at 512 px only."""
    from dcae.diffusion.bench import format_table, run_bench

    gpu = Ctx.dev == "cuda"
    overrides = None if gpu else {"num_layers": 1, "max_tokens": 8, "caption_channels": 16}
    records = run_bench(["SANA-1600M" if gpu else "SANA-tiny"], 8 if gpu else 1, torch.device(Ctx.dev),
                        torch.bfloat16 if gpu else torch.float32, warmup=2 if gpu else 0, steps=3 if gpu else 1,
                        overrides=overrides, resolutions=(512, 1024) if gpu else (512,),
                        sample_steps=5 if gpu else 1)  # fmt: skip
    print(format_table(records), flush=True)
    return records


def bench_plan() -> list[tuple]:
    """(model, resolutions, batches, impls) entries; the first is the eager f32c32-in table."""
    res = [Ctx.px(r) for r in B.GPU_RES]
    plan = [
        (Ctx.model("dc-ae-f32c32-in-1.0"), res, [16, 4, 1, 1], ["dcae", "diffusers"]),
        (Ctx.model("dc-ae-f32c32-in-1.0"), res[:2], [16, 4], ["dcae-compiled", "diffusers-compiled"]),
        (Ctx.model("dc-ae-f32c32-sana-1.0"), res[:1], [16], ["dcae-compiled", "diffusers-compiled"]),
        (Ctx.model("dc-ae-f32c32-sana-1.0"), res, [16, 4, 1, 1], ["dcae", "diffusers"]),
    ]
    plan = [(m, r, [Ctx.batch(b) for b in bs], impls) for m, r, bs, impls in plan]
    if Ctx.dev != "cuda":  # dry run: the compiled variants would take minutes to build on a CPU
        plan = [p for p in plan if "compiled" not in p[3][0]]
    try:
        import diffusers  # noqa: F401
    except ImportError:
        plan = [(m, r, b, [i for i in impls if i.startswith("dcae")]) for m, r, b, impls in plan]
    return plan


def bench(report: Report, plan: list[tuple], records: list, path: Path, budget_s: float) -> None:
    """One model build per entry (building a full-size model and its diffusers twin takes ~15 s);
    `records` grows across calls and the JSON at `path` is rewritten after every entry."""
    for name, res, batch, impls in plan:
        if time.time() - T0 > budget_s:
            report.add(f"bench_skipped_{name}_{'_'.join(impls)}", "time budget reached")
            continue
        try:
            records += B.bench_model(name, res, batch, Ctx.bench_dtype, Ctx.dev, impls, warmup=Ctx.warmup,
                                     repeats=Ctx.repeats, memory=True,
                                     command="PYTHONPATH=src python benchmarks/gpu_check.py")  # fmt: skip
        except Exception as exc:
            report.add(
                f"bench_error_{name}_{'_'.join(impls)}", {"error": repr(exc), "tb": traceback.format_exc()[-2000:]}
            )
        empty_cache()
        if records:
            B.write_results(records, path)
    report.add("bench_table", B.format_table(records))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--dry-run", type=Path, default=None, metavar="TINY_CONFIG",
                        help="CPU rehearsal with this small model config (JSON/YAML) and 1/8 sizes")  # fmt: skip
    args = parser.parse_args()
    warnings.filterwarnings("error", category=FastPathFallbackWarning)  # a fast path that fails is a failure here
    if args.dry_run:
        Ctx.dev, Ctx.div, Ctx.backend = "cpu", 16, "eager"
        Ctx.bench_dtype, Ctx.warmup, Ctx.repeats = "fp32", 1, 1
        Ctx.model_names = dry_run_models(args.dry_run, args.out)
    elif not torch.cuda.is_available():
        print("gpu_check needs a CUDA device (or --dry-run on CPU)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if Ctx.dev == "cuda" else "cpu-dry-run"
    device = device.replace(" ", "-").replace("/", "-")
    stamp = f"{device}_{dt.date.today().isoformat()}"
    report = Report(args.out / f"gpu_check_{stamp}.json")
    report.add("environment", environment())
    report.guarded("triton_kernels", check_kernels)
    for name in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0"):
        report.guarded(f"correctness_{name}", lambda n=name: check_model(n))
    report.guarded("tiling", check_tiling)
    report.guarded("cuda_graphs_and_compile", check_graphs_and_compile)
    plan, records, path = bench_plan(), [], args.out / f"ae_gpu_{stamp}.json"
    bench(report, plan[:1], records, path, args.budget_s)
    report.guarded("profile", profile_models)
    bench(report, plan[1:], records, path, args.budget_s)
    # The least urgent parts: the data for the next GPU defaults, then the diffusion throughput (#6), class and
    # text-to-image.
    for section, fn in (
        ("fast_path_variants", variants),
        ("diffusion_throughput", diffusion_throughput),
        ("diffusion_t2i_throughput", diffusion_t2i_throughput),
    ):
        if time.time() - T0 < args.budget_s:
            report.guarded(section, fn)
        else:
            report.add(section, "skipped: time budget reached")
    return judge(report, records, args.out, stamp)


def dry_run_models(tiny: Path, out: Path) -> dict[str, str]:
    """One copy of the tiny config per released name, named after it, so that the records and the goals of
    a dry run carry the names of the models they stand in for."""
    folder = out / "dry_run_models"
    folder.mkdir(parents=True, exist_ok=True)
    names = {}
    for name in ("dc-ae-f32c32-in-1.0", "dc-ae-f32c32-sana-1.0"):
        names[name] = str(folder / f"{name}{tiny.suffix}")
        Path(names[name]).write_text(tiny.read_text())
    return names


def judge(report: Report, records: list, out: Path, stamp: str) -> int:
    """Correctness gates decide the exit code; the performance goals are reported as met or missed."""
    sections = report.data["sections"]
    failures = gpu_gates.gates(sections, on_gpu=Ctx.dev == "cuda")
    goal_rows = gpu_gates.goals(sections, records, Ctx.px(512), Ctx.px(1024))
    report.add("gates", {"passed": not failures, "failures": failures})
    report.add("goals", goal_rows)
    table = gpu_gates.format_goals(goal_rows)
    (out / f"goals_{stamp}.md").write_text(table + "\n")
    print("\nperformance goals (facts file section 7):\n" + table)
    print(f"\ndone in {time.time() - T0:.0f} s; results in {out}")
    if failures:
        print(f"{len(failures)} correctness gate(s) FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("all correctness gates passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
