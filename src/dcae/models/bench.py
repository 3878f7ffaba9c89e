"""`dcae bench ae`: encode/decode throughput and peak memory, ours against diffusers' AutoencoderDC.

Both run in the same process with identical weights (ours converted with `original_to_diffusers`):
- "dcae": our model as users get it (the fast path is on by default);
- "diffusers": `AutoencoderDC` as diffusers ships it (eager);
- "diffusers-compiled": what a savvy user does with it: channels-last + `torch.compile` on encoder
  and decoder (only with --compile); "dcae-compiled" is ours compiled the same way.

Timing: warm-up runs, then the median of --repeats timed runs, the implementations interleaved run by
run so that a busy machine slows all of them alike; `torch.cuda.synchronize()` around every timed run
on GPU. Peak memory: on CUDA `max_memory_allocated` during one run (weights included); on CPU the peak
of live tensor bytes during one extra, untimed run (a dispatch mode that tracks every tensor the call
allocates, plus the weights): allocator-independent and comparable between implementations.

--models takes zoo names and config files (a randomly initialised model of that config: the timing does
not depend on the weights) and anything `DCAE.from_pretrained` loads (a saved folder such as a trained
decoder's `runs/x/phase3/model`, a weight file, a Hub id). A model that diffusers cannot express (e.g.
residual shortcuts off) runs without the diffusers implementations, with a one-line note.

The JSON is a list of records with keys model (as given to --models), impl, res, batch, dtype, device,
enc_img_s, dec_img_s, enc_peak_gib, dec_peak_gib, plus weights ("random" or "loaded"), enc_s/dec_s (median
seconds per call), compile_s, threads, device_name, torch, diffusers, date and the command.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dcae.utils.cliargs import DefaultsHelpFormatter, add_device, add_dtype, add_seed, nonnegative_int, positive_int

GIB = 1024**3
IMPLS = ("dcae", "diffusers", "dcae-compiled", "diffusers-compiled")
# Section 7 of the facts: the batch size that goes with each resolution.
DEFAULT_BATCH = {256: 1, 512: 16, 1024: 4, 2048: 1, 4096: 1}
GPU_RES = (512, 1024, 2048, 4096)
CPU_RES = (256,)


# ----------------------------------------------------------------------------- CLI
def register_bench(subparsers) -> None:
    p = subparsers.add_parser(
        "ae",
        help="autoencoder encode/decode throughput and memory, ours vs diffusers",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--models",
        nargs="+",
        default=["dc-ae-f32c32-in-1.0"],
        metavar="MODEL",
        help="zoo names or config files (random weights), saved folders, weight files or Hub ids",
    )
    p.add_argument("--res", nargs="+", type=positive_int, default=None,
                   help="square resolutions (default: GPU 512 1024 2048 4096)")  # fmt: skip
    p.add_argument(
        "--batch", nargs="+", type=positive_int, default=None, help="batch per resolution (default 16/4/1/1)"
    )
    add_dtype(p, "compute", default=None, auto="bf16 on GPU, fp32 on CPU")
    add_device(p, default=None)
    p.add_argument("--compile", action="store_true", help="add the torch.compile'd (channels-last) variants")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None, help="which implementations to run")
    p.add_argument("--warmup", type=nonnegative_int, default=1, help="untimed runs before each measurement")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per measurement (default: GPU 10, CPU 3)")  # fmt: skip
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--json", type=Path, default=None, help="write the records here (and a .md table next to it)")
    add_seed(p, "seed of the random weights and inputs")


def run(args: argparse.Namespace) -> int:
    import torch

    from dcae.utils.io import check_input, check_output_file

    if args.json:  # written after each model: checked before the first
        check_output_file(args.json, overwrite=True, what="--json file")
        check_output_file(args.json.with_suffix(".md"), overwrite=True, what="table")
    for name in args.models:
        check_input(name, "model", must_exist=False)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = args.res or list(GPU_RES if device.startswith("cuda") else CPU_RES)
    batches = _batches(res, args.batch)
    dtype = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    impls = args.impls or (["dcae", "diffusers"] + (["dcae-compiled", "diffusers-compiled"] if args.compile else []))
    repeats = args.repeats or (10 if device.startswith("cuda") else 3)
    command = _command(args, res, batches, dtype, device, impls, repeats)
    records = []
    for name in args.models:
        records += bench_model(name, res, batches, dtype, device, impls, args.warmup, repeats, not args.no_memory,
                               args.seed, command)  # fmt: skip
        if args.json:  # after every model, so a long run leaves its results behind
            write_results(records, args.json)
    print(format_table(records))
    if args.json:
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


def _command(args: argparse.Namespace, res, batches, dtype: str, device: str, impls, repeats: int) -> str:
    """The fully spelled-out command that reproduces this run (defaults resolved)."""
    models = [shlex.quote(str(m)) for m in args.models]
    parts = ["dcae bench ae", "--models", *models, "--res", *map(str, res), "--batch", *map(str, batches)]
    parts += ["--dtype", dtype, "--device", device, "--impls", *impls, "--warmup", str(args.warmup)]
    parts += ["--repeats", str(repeats)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    if args.json:
        parts += ["--json", str(args.json)]
    return " ".join(parts)


def _batches(res: list[int], batch: list[int] | None) -> list[int]:
    if batch is None:
        return [DEFAULT_BATCH.get(r, 1) for r in res]
    if len(batch) == 1:
        return batch * len(res)
    if len(batch) != len(res):
        from dcae.cli import CLIError

        raise CLIError(f"--batch needs one value or one per --res ({len(res)}), got {len(batch)}")
    return batch


# ----------------------------------------------------------------------------- building the contenders
def build_impls(name: str, dtype, device: str, impls: list[str], seed: int = 0) -> dict[str, Any]:
    """name -> object with .encode(x) and .decode(z) tensors, all with the same weights. The diffusers
    implementations are left out (with a note on stderr) where diffusers cannot build this model."""
    ours = load_model(name, seed)
    out: dict[str, Any] = {}
    if any(i.startswith("diffusers") for i in impls):
        peer = _diffusers_twin_or_note(ours, name)
        if peer is not None:
            peer = peer.to(device=device, dtype=dtype)
            if "diffusers" in impls:
                out["diffusers"] = _DiffusersRunner(peer)
            if "diffusers-compiled" in impls:
                out["diffusers-compiled"] = _DiffusersRunner(_compiled(copy.deepcopy(peer)), channels_last=True)
    ours = ours.to(device=device, dtype=dtype)
    if "dcae" in impls:
        out["dcae"] = _OursRunner(ours)
    if "dcae-compiled" in impls:
        from dcae.models.fast import compile_dcae

        out["dcae-compiled"] = _OursRunner(compile_dcae(copy.deepcopy(ours)), channels_last=True)
    return {i: out[i] for i in impls if i in out}


def load_model(name: str, seed: int = 0):
    """Zoo names and config files give a randomly initialised model (seeded), anything else goes to
    `DCAE.from_pretrained` (a saved folder, a weight file, a Hub id)."""
    import torch

    from dcae import DCAE

    if weights_kind(name) == "random":
        torch.manual_seed(seed)
        return DCAE.from_config(name).eval()
    return DCAE.from_pretrained(name).eval()


def weights_kind(name: str) -> str:
    """How `load_model` gets the weights: "random" for a config file or a zoo name that is not also a
    local path, else "loaded"."""
    from dcae.models.config import is_model_name

    path = Path(name).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml", ".json") and not path.name.endswith(".index.json"):
        return "random"
    return "random" if not path.exists() and is_model_name(name) else "loaded"


def _diffusers_twin_or_note(model, name: str):
    """The diffusers twin, or None with a one-line note when diffusers is missing or cannot express it."""
    try:
        from dcae.models.convert import DiffusersConfigError

        return _diffusers_twin(model)
    except ImportError as exc:
        why = f"diffusers is not installed ({exc})"
    except DiffusersConfigError as exc:
        why = f"diffusers cannot express this model ({exc})"
    print(f"dcae: note: {name}: {why}; skipping the diffusers implementations", file=sys.stderr, flush=True)
    return None


def _diffusers_twin(model):
    from diffusers import AutoencoderDC
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # a cast warning about an empty list of fp32 modules

    from dcae.models.convert import original_to_diffusers, to_diffusers_config

    cfg = {k: v for k, v in to_diffusers_config(model.config).items() if not k.startswith("_")}
    twin = AutoencoderDC(**cfg).eval()
    twin.load_state_dict(original_to_diffusers(model.state_dict(), model.config), strict=True)
    return twin


def _compiled(peer):
    import torch

    peer = peer.to(memory_format=torch.channels_last)
    peer.encoder.compile()
    peer.decoder.compile()
    return peer


class _OursRunner:
    def __init__(self, model, channels_last: bool = False) -> None:
        self.model, self.channels_last = model, channels_last

    def encode(self, x):
        return self.model.encode(_cl(x) if self.channels_last else x)

    def decode(self, z):
        return self.model.decode(_cl(z) if self.channels_last else z)

    def weight_bytes(self) -> int:
        """Weights plus what the fast path keeps beside them (folded and Winograd-transformed filters)."""
        fast = self.model.__dict__.get("_fast")
        cached = fast.cache_bytes() if fast is not None else 0
        return sum(p.numel() * p.element_size() for p in self.model.parameters()) + cached


class _DiffusersRunner(_OursRunner):
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def encode(self, x):
        return self.model.encode(_cl(x) if self.channels_last else x).latent

    def decode(self, z):
        return self.model.decode(_cl(z) if self.channels_last else z).sample


def _cl(x):
    import torch

    return x.contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- measuring
def bench_model(
    name: str,
    res: list[int],
    batches: list[int],
    dtype_name: str,
    device: str,
    impls: list[str],
    warmup: int,
    repeats: int,
    memory: bool,
    seed: int = 0,
    command: str = "",
) -> list[dict[str, Any]]:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    runners = build_impls(name, dtype, device, impls, seed)
    if not runners:
        return []
    first = next(iter(runners.values()))
    meta = {"weights": weights_kind(name), **_environment(device)}
    records = []
    for r, b in zip(res, batches):
        g = torch.Generator().manual_seed(seed)
        x = (torch.rand(b, 3, r, r, generator=g) * 2 - 1).to(device=device, dtype=dtype)
        with torch.inference_mode():
            z = first.encode(x)
        times, compile_s = _time_interleaved(runners, x, z, warmup, repeats, device)
        for impl, runner in runners.items():
            enc_s, dec_s = statistics.median(times[impl]["enc"]), statistics.median(times[impl]["dec"])
            rec = {"model": name, "impl": impl, "res": r, "batch": b, "dtype": dtype_name, "device": device,
                   "enc_img_s": round(b / enc_s, 4), "dec_img_s": round(b / dec_s, 4),
                   "enc_peak_gib": None, "dec_peak_gib": None,
                   "enc_s": round(enc_s, 5), "dec_s": round(dec_s, 5), "compile_s": round(compile_s[impl], 2),
                   "repeats": repeats, **meta, "command": command}  # fmt: skip
            if memory:
                rec["enc_peak_gib"] = round(peak_bytes(runner.encode, x, device, runner) / GIB, 4)
                rec["dec_peak_gib"] = round(peak_bytes(runner.decode, z, device, runner) / GIB, 4)
            records.append(rec)
            print(_one_line(rec), flush=True)
    return records


def _time_interleaved(runners: dict, x, z, warmup: int, repeats: int, device: str):
    import torch

    times = {i: {"enc": [], "dec": []} for i in runners}
    compile_s = dict.fromkeys(runners, 0.0)
    with torch.inference_mode():
        for impl, runner in runners.items():
            t0 = time.perf_counter()
            for _ in range(max(1, warmup)):
                runner.encode(x)
                runner.decode(z)
            _sync(device)
            if impl.endswith("compiled"):  # the first call compiles; report it rather than hide it
                compile_s[impl] = time.perf_counter() - t0
        for _ in range(repeats):
            for impl, runner in runners.items():
                times[impl]["enc"].append(_timed(lambda r=runner: r.encode(x), device))
                times[impl]["dec"].append(_timed(lambda r=runner: r.decode(z), device))
    return times, compile_s


def _timed(fn: Callable[[], Any], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_bytes(fn: Callable[[Any], Any], arg, device: str, runner=None) -> int:
    """Peak memory of one call fn(arg): CUDA allocator peak, or (CPU) peak live tensor bytes + weights."""
    import torch

    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            fn(arg)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        weights = runner.weight_bytes() if runner is not None else 0
        return weights + peak_tensor_bytes(lambda: fn(arg))


def peak_tensor_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of tensors alive at once among those that `fn` allocates (any device, meta included).

    A TorchDispatchMode sees every aten op; each new storage is counted until the last tensor using it
    is freed. Backend scratch space (e.g. oneDNN workspaces) is not included.
    """
    from dcae.models.memory import TensorMemoryTracker

    with TensorMemoryTracker() as tracker:
        fn()
    return tracker.peak


def _environment(device: str) -> dict[str, Any]:
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return {
        "threads": torch.get_num_threads(),
        "device_name": name,
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "date": _dt.date.today().isoformat(),
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


# ----------------------------------------------------------------------------- output
def _one_line(r: dict[str, Any]) -> str:
    mem = f" peak {r['enc_peak_gib']:.2f}/{r['dec_peak_gib']:.2f} GiB" if r["enc_peak_gib"] is not None else ""
    return (
        f"{r['model']} {r['impl']:>18s} {r['res']}px b{r['batch']} {r['dtype']}: "
        f"encode {r['enc_img_s']:.3f} img/s, decode {r['dec_img_s']:.3f} img/s{mem}"
    )


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one row per (model, res, batch, impl); time ratios against both diffusers variants."""
    base = {(r["model"], r["res"], r["batch"], r["impl"]): r for r in records}
    lines = [
        "| model | res | batch | impl | encode img/s | decode img/s | enc peak GiB | dec peak GiB "
        "| time vs diffusers (enc / dec) | time vs diffusers-compiled (enc / dec) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        cells = [r["model"], r["res"], r["batch"], r["impl"], f"{r['enc_img_s']:.3f}", f"{r['dec_img_s']:.3f}",
                 _fmt(r["enc_peak_gib"]), _fmt(r["dec_peak_gib"])]  # fmt: skip
        for peer in ("diffusers", "diffusers-compiled"):
            p = base.get((r["model"], r["res"], r["batch"], peer))
            # time ratio = peer throughput / our throughput: < 1 means faster than the peer
            cells.append(
                f"{p['enc_img_s'] / r['enc_img_s']:.2f}x / {p['dec_img_s'] / r['dec_img_s']:.2f}x" if p else "-"
            )
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_results(records: list[dict[str, Any]], path: Path) -> None:
    from dcae.utils.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    r0 = records[0] if records else {}
    header = (
        f"# DC-AE autoencoder benchmark ({r0.get('device_name', '?')}, {r0.get('date', '?')})\n\n"
        f"torch {r0.get('torch')}, diffusers {r0.get('diffusers')}, {r0.get('threads')} threads, "
        f"median of {r0.get('repeats')} runs. Time ratios: our time / diffusers' time (< 1: faster).\n\n"
        f"Reproduce: `{r0.get('command', '')}`\n\n"
    )
    atomic_write_text(path.with_suffix(".md"), header + format_table(records) + "\n")
    if records:
        plot_results(records, path.with_suffix(".png"))


def plot_results(records: list[dict[str, Any]], path: Path) -> Path:
    """Encode and decode img/s per (model, resolution, batch), one bar per implementation."""
    from dcae.utils.plots import bar_chart

    keys = list(dict.fromkeys((r["model"], r["res"], r["batch"]) for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records))
    value = {(r["model"], r["res"], r["batch"], r["impl"]): r for r in records}
    panels = {
        f"{what} img/s": {i: [value.get((*k, i), {}).get(f"{what[:3]}_img_s") for k in keys] for i in impls}
        for what in ("encode", "decode")
    }
    groups = [f"{m.removeprefix('dc-ae-')}\n{res}px b{b}" for m, res, b in keys]
    r0 = records[0]
    return bar_chart(panels, groups, path, f"{r0.get('device_name', r0.get('device'))}, {r0.get('dtype')}", "img/s")


def main(argv: list[str] | None = None) -> int:
    """`python -m dcae.models.bench ...` / benchmarks/bench_ae.py: the same options as `dcae bench ae`."""
    parser = argparse.ArgumentParser(prog="dcae bench ae", description=__doc__.split("\n\n")[0],
                                     formatter_class=DefaultsHelpFormatter)  # fmt: skip
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
