"""`dcae t2i eval`: generate one image per prompt, then CLIP score (overall and per category) and optional FID.

    dcae t2i eval --ckpt runs/t2i --prompts MJHQ-30K/meta_data.json --limit 1000 --subset-seed 0 \\
        --fid-ref MJHQ-30K/mjhq_stats.npz -o eval/

Prompts: MJHQ's `meta_data.json` ({id: {"prompt": ..., "category": ...}}, ids sorted) or a text file (one
prompt per line, category "all"). Images go to OUT/images/%06d.png before any metric is computed, under the
folder's plan (dcae.diffusion.generation: OUT/plan.json): a rerun with the same prompts and settings makes
only the missing ones, one with others is refused unless --overwrite. Writes OUT/results.json,
OUT/results.md and OUT/grids/<category>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

from dcae.errors import UserError

GRID = 8  # images per category grid


def read_eval_prompts(path: str | Path) -> list[dict]:
    """[{"id", "prompt", "category"}] from MJHQ's meta_data.json (ids sorted) or a text file (category "all")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompts from {path}: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict):
            raise UserError(f"{path}: expected MJHQ's meta_data.json, {{id: {{'prompt': ..., 'category': ...}}}}")
        items = []
        for key in sorted(meta):
            entry = meta[key]
            if not isinstance(entry, dict) or not str(entry.get("prompt") or "").strip():
                raise UserError(f"{path}: entry {key!r} has no 'prompt'")
            items.append({"id": str(key), "prompt": str(entry["prompt"]).strip(),
                          "category": str(entry.get("category") or "all")})  # fmt: skip
    else:
        lines = [line.strip() for line in text.splitlines()]
        prompts = [line for line in lines if line and not line.startswith("#")]
        items = [{"id": f"{i:06d}", "prompt": p, "category": "all"} for i, p in enumerate(prompts)]
    if not items:
        raise UserError(f"{path} holds no prompts")
    return items


def subset(items: list[dict], limit: int | None, seed: int = 0) -> list[dict]:
    """All prompts, or `limit` of them drawn with `seed` (the same seed, the same subset), in their order."""
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        raise UserError(f"--limit {limit}: give a positive number of prompts")
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]


def _grid_name(category: str) -> str:
    return re.sub(r"[^\w.-]+", "_", category).strip("._") or "category"


def clip_scores(source: str, paths: list[Path], items: list[dict], device, batch_size: int):
    """Per-image CLIP scores of the written images and the accumulator (overall and per-category means)."""
    from dcae.data.images import load_image_uint8
    from dcae.metrics.clip_score import ClipScoreAccumulator, ClipScorer

    scorer = ClipScorer.from_pretrained(source, device=device)
    acc, scores = ClipScoreAccumulator(), []
    for start in range(0, len(paths), batch_size):
        batch = items[start : start + batch_size]
        images = [load_image_uint8(p).copy() for p in paths[start : start + batch_size]]  # writable
        values = acc.update(scorer, images, [i["prompt"] for i in batch], [i["category"] for i in batch])
        scores += values.tolist()
    return scores, acc


def cmd_eval(args: argparse.Namespace) -> int:
    from dcae.diffusion.t2i.sampling import check_model_source, generate_images
    from dcae.metrics.clip_score import _folder
    from dcae.utils.devices import resolve_device
    from dcae.utils.io import atomic_write_json, check_input, check_output_dir

    out = check_output_dir(args.output, "output folder (-o)")
    check_model_source(args)
    every = read_eval_prompts(check_input(args.prompts, "--prompts"))
    items = subset(every, args.limit, args.subset_seed)
    if args.fid_ref:
        check_input(args.fid_ref, "--fid-ref")
    clip_folder = _folder(args.clip)  # fails now (one line), not after the images: a Hub id offline, a bad folder
    derived = ("results.json", "results.md", "grids")  # removed with the images by --overwrite
    paths, settings, rank = generate_images(args, [i["prompt"] for i in items], out, stale=derived)
    if rank != 0:
        return 0
    device = resolve_device(args.device)
    scores, acc = clip_scores(str(clip_folder), paths, items, device, args.batch_size)
    fid = None
    if args.fid_ref:
        from dcae.diffusion.generation import compute_gfid

        fid = compute_gfid([str(p) for p in paths], args.fid_ref, device, args.fid_resolution)
    categories = sorted({i["category"] for i in items})
    counts = {c: sum(i["category"] == c for i in items) for c in categories}
    means = acc.per_category()
    results = {
        "settings": settings,
        "prompts": {"file": str(args.prompts), "total": len(every), "limit": args.limit,
                    "subset_seed": args.subset_seed, "count": len(items), "ids": [i["id"] for i in items]},
        "clip": {"model": str(args.clip), "clip_score": acc.compute(),
                 "per_category": {c: {"clip_score": means[c], "images": counts[c]} for c in categories}},
        "fid": fid, "fid_ref": str(args.fid_ref) if args.fid_ref else None,
        "images": [{"id": i["id"], "file": p.name, "category": i["category"], "prompt": i["prompt"],
                    "clip_score": s} for i, p, s in zip(items, paths, scores, strict=True)],
    }  # fmt: skip
    grids = _write_grids(out, paths, items, categories)
    atomic_write_json(out / "results.json", results)
    (out / "results.md").write_text(_markdown(results, categories), encoding="utf-8")
    fid_text = f", FID {fid:.2f}" if fid is not None else ""
    print(f"CLIP score {acc.compute():.2f} over {len(items)} images in {len(categories)} categor"
          f"{'y' if len(categories) == 1 else 'ies'}{fid_text}: {out / 'results.json'}, {len(grids)} grid(s) in "
          f"{out / 'grids'}")  # fmt: skip
    return 0


def _write_grids(out: Path, paths: list[Path], items: list[dict], categories: list[str]) -> list[Path]:
    from dcae.data.images import load_image, make_grid, save_image

    written = []
    for c in categories:
        chosen = [p for p, i in zip(paths, items, strict=True) if i["category"] == c][:GRID]
        file = out / "grids" / f"{_grid_name(c)}.png"
        file.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid([load_image(p) for p in chosen], nrow=GRID), file)
        written.append(file)
    return written


def _markdown(results: dict, categories: list[str]) -> str:
    def num(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"

    s, clip = results["settings"], results["clip"]
    source = s.get("checkpoint") or s.get("model")
    lines = [f"# Text-to-image evaluation: {source}", "",
             f"{results['prompts']['count']} prompts of {results['prompts']['total']} ({results['prompts']['file']}); "
             f"{s.get('solver')}, {s.get('steps')} steps, CFG {s.get('cfg')}, seed {s.get('seed')}; "
             f"CLIP {clip['model']}.", "",
             "| Category | Images | CLIP score | Grid |", "| --- | ---: | ---: | --- |"]  # fmt: skip
    for c in categories:
        entry = clip["per_category"][c]
        lines.append(f"| {c} | {entry['images']} | {num(entry['clip_score'])} | grids/{_grid_name(c)}.png |")
    lines.append(f"| **all** | {results['prompts']['count']} | {num(clip['clip_score'])} | |")
    lines += ["", f"FID: {num(results['fid'])}" + (f" (against {results['fid_ref']})" if results["fid_ref"] else "")]
    return "\n".join(lines) + "\n"


def _eval_fits(args: argparse.Namespace) -> None:
    """--size with --batch-size, and --fid-resolution, fit in memory, or one line before any work."""
    from dcae.diffusion.t2i.sampling import check_size_fits
    from dcae.utils.sizes import check_images_fit

    check_size_fits(args, args.limit)
    r = args.fid_resolution
    check_images_fit(r, r, 1, args.device, f"--fid-resolution {r}")


def add_eval_parser(tsub: argparse._SubParsersAction) -> None:
    from dcae.diffusion.t2i.sampling import add_sampling_options
    from dcae.utils.cliargs import add_output, positive_int, seed_int, with_checks

    v = tsub.add_parser("eval", help="generate images for a prompt set (MJHQ), then CLIP score per category and FID")
    v.add_argument("--prompts", required=True, help="MJHQ meta_data.json or a text file (one prompt per line)")
    add_output(v, "output folder: images/, results.json, results.md, grids/; reruns resume")
    v.add_argument("--limit", type=positive_int, help="a random subset of this many prompts (default: all)")
    v.add_argument("--subset-seed", type=seed_int, default=0,
                   help="seed of the --limit subset (same seed, same subset)")  # fmt: skip
    v.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP model: Hub id or folder")
    v.add_argument("--fid-ref", help="FID reference: .npz statistics (mu, sigma) or an image folder")
    v.add_argument("--fid-resolution", type=positive_int, default=512, help="ADM center crop of a reference folder")
    add_sampling_options(v)
    v.set_defaults(func=with_checks(cmd_eval, _eval_fits))
