"""What `gpu_check.py` judges: correctness gates (a failure makes the script exit non-zero) and the
performance goals of the facts file (reported as met or missed; they do not change the exit code).

Kept apart from the script so that the judging itself is tested (tests/test_bench.py) on reports
that pass and reports that must fail.

Bounds and why:
- fp32 with TF32 off: fast path vs eager modules and vs diffusers within 1e-4 relative. The kernels
  differ (folded BatchNorm, fused norms, other conv algorithms), so agreement is to rounding (1e-6 is
  typical), never bitwise; 1e-4 still catches any wrong layer, which is O(1).
- bf16: within 5e-2 relative. Two bf16 pipelines that round at different places differ by ~1e-2 on
  random weights; a broken kernel or a wrong layout is O(1).
- Triton kernels against PyTorch: 1e-5 in fp32 (both accumulate in fp32), 2e-2 in bf16/fp16.
- exact tiling against untiled, fp32: above 80 dB PSNR; a seam or a wrong margin costs 30-60 dB.
- fp16 with the overflow plan: finite, and within 5e-2 of the fp32 reconstruction.
- CUDA graphs replay the same kernels: 1e-3; compiled vs eager in bf16: 5e-2.
"""

from __future__ import annotations

from typing import Any

FP32, LOW = 1e-4, 5e-2
KERNEL_FP32, KERNEL_LOW = 1e-5, 2e-2
EXACT_TILING_DB = 80.0
GRAPH, COMPILED = 1e-3, 5e-2

# Facts file section 7 and the fast-inference goals: (what, model, impl we compare against, res, ratio).
EAGER_GOAL = 2.0  # dcae out of the box vs diffusers eager bf16, f32c32-in, encode and decode, 512 and 1024 px
COMPILED_GOALS = (("dc-ae-f32c32-in-1.0", "enc", 1.2), ("dc-ae-f32c32-in-1.0", "dec", 1.2),
                  ("dc-ae-f32c32-sana-1.0", "dec", 1.6))  # fmt: skip
MEMORY_GOAL = 1 / 3  # 4096 px exact-tiled decode peak / untiled peak


def _bound(failures: list[str], where: str, value: Any, limit: float, above: bool = False) -> None:
    ok = isinstance(value, (int, float)) and (value > limit if above else value < limit)
    if not ok:
        failures.append(f"{where} = {value!r} ({'needs >' if above else 'needs <'} {limit:g})")


def _errors(name: str, section: Any) -> list[str]:
    if isinstance(section, dict) and "error" in section:
        return [f"{name} raised {section['error']}"]
    return []


def gate_kernels(section: Any, on_gpu: bool) -> list[str]:
    fails = _errors("triton_kernels", section)
    if fails or not isinstance(section, dict):
        return fails or [f"triton_kernels: unexpected {section!r}"]
    if "skipped" in section:
        return ["triton_kernels: Triton is not available on the GPU"] if on_gpu else []
    if section.get("fast_path_self_check") != "ok":
        fails.append(f"triton_kernels: the fast path's own check says {section.get('fast_path_self_check')!r}")
    for key, value in section.items():
        if key.startswith(("rms_", "attn_")):
            _bound(fails, f"triton_kernels.{key}", value, KERNEL_FP32 if key.endswith("float32") else KERNEL_LOW)
    return fails


def gate_model(name: str, section: Any) -> list[str]:
    where = f"correctness_{name}"
    fails = _errors(where, section)
    if fails:
        return fails
    for key in ("float32_fast_vs_eager", "float32_fast_vs_diffusers", "bfloat16_fast_vs_eager",
                "bfloat16_fast_vs_diffusers"):  # fmt: skip
        if key not in section:
            if "diffusers" not in key:  # without diffusers installed the peer comparisons are absent
                fails.append(f"{where}.{key} is missing")
            continue
        for what in ("enc", "dec"):
            _bound(fails, f"{where}.{key}.{what}", section[key].get(what), FP32 if "float32" in key else LOW)
    if section.get("fp16_finite") is not True:
        fails.append(f"{where}.fp16_finite = {section.get('fp16_finite')!r} (needs True)")
    _bound(fails, f"{where}.fp16_vs_fp32_recon", section.get("fp16_vs_fp32_recon"), LOW)
    return fails


def gate_tiling(section: Any) -> list[str]:
    fails = _errors("tiling", section)
    if not fails:
        _bound(fails, "tiling.exact_fp32_psnr_vs_untiled", section.get("exact_fp32_psnr_vs_untiled"),
               EXACT_TILING_DB, above=True)  # fmt: skip
    return fails


def gate_graphs(section: Any, on_gpu: bool) -> list[str]:
    fails = _errors("cuda_graphs_and_compile", section)
    if fails:
        return fails
    if on_gpu:
        for key in ("graph_enc_rel", "graph_dec_rel"):
            _bound(fails, f"cuda_graphs_and_compile.{key}", section.get(key), GRAPH)
    _bound(fails, "cuda_graphs_and_compile.compiled_dec_rel", section.get("compiled_dec_rel"), COMPILED)
    return fails


def gates(sections: dict[str, Any], on_gpu: bool) -> list[str]:
    """Every correctness failure of a gpu_check report, one line each; empty when all passed."""
    fails: list[str] = []
    if "triton_kernels" in sections:
        fails += gate_kernels(sections["triton_kernels"], on_gpu)
    models = [k.removeprefix("correctness_") for k in sections if k.startswith("correctness_")]
    if not models:
        fails.append("no correctness section ran")
    for name in models:
        fails += gate_model(name, sections[f"correctness_{name}"])
    fails += gate_tiling(sections.get("tiling", {"error": "tiling section missing"}))
    if "cuda_graphs_and_compile" in sections:
        fails += gate_graphs(sections["cuda_graphs_and_compile"], on_gpu)
    return fails


# ----------------------------------------------------------------------------- performance goals
def _speed(records: list[dict], model: str, impl: str, res: int, what: str) -> float | None:
    for r in records:
        if model in r["model"] and r["impl"] == impl and r["res"] == res:  # a name, or a dry run's file named so
            return r[f"{what}_img_s"]
    return None


def _goal(goal: str, ours: float | None, theirs: float | None, target: float, detail: str = "") -> dict:
    ratio = None if not (ours and theirs) else round(ours / theirs, 3)
    status = "not measured" if ratio is None else ("met" if ratio >= target else "missed")
    return {"goal": goal, "target": target, "ratio": ratio, "status": status, "detail": detail}


def goals(sections: dict[str, Any], records: list[dict], res512: int = 512, res1024: int = 1024) -> list[dict]:
    """The facts file's performance goals, each with the measured ratio and met / missed / not measured."""
    out = []
    for res in (res512, res1024):
        for what in ("enc", "dec"):
            ours = _speed(records, "dc-ae-f32c32-in-1.0", "dcae", res, what)
            theirs = _speed(records, "dc-ae-f32c32-in-1.0", "diffusers", res, what)
            out.append(_goal(f"f32c32-in {what} {res} px: dcae vs diffusers eager bf16", ours, theirs, EAGER_GOAL))
    for model, what, target in COMPILED_GOALS:
        theirs = _speed(records, model, "diffusers-compiled", res512, what)
        candidates = {i: _speed(records, model, i, res512, what) for i in ("dcae", "dcae-compiled")}
        best = max((i for i in candidates if candidates[i]), key=lambda i: candidates[i], default=None)
        ours = candidates.get(best) if best else None
        short = model.removeprefix("dc-ae-").removesuffix("-1.0")
        out.append(_goal(f"{short} {what} {res512} px: dcae vs diffusers channels-last + compile", ours, theirs,
                         target, f"best dcae variant: {best}"))  # fmt: skip
    tiling = sections.get("tiling", {})
    ratio = tiling.get("dec_peak_ratio_exact") if isinstance(tiling, dict) else None
    out.append({"goal": "4096 px decode peak memory, exact tiles / untiled", "target": MEMORY_GOAL,
                "ratio": ratio, "status": "not measured" if ratio is None else
                ("met" if ratio <= MEMORY_GOAL else "missed"), "detail": "lower is better"})  # fmt: skip
    return out


def format_goals(rows: list[dict]) -> str:
    lines = ["| goal | target | measured | status |", "|---|---|---|---|"]
    for g in rows:
        target = f"<= {g['target']:.2f}" if g["detail"] == "lower is better" else f">= {g['target']:g}x"
        measured = "-" if g["ratio"] is None else f"{g['ratio']:.2f}"
        lines.append(f"| {g['goal']} | {target} | {measured} | {g['status']} |")
    return "\n".join(lines)
