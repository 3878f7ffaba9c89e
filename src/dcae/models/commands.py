"""Autoencoder commands: `dcae models | encode | decode | reconstruct | convert | demo`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from dcae.errors import UserError, non_finite_warnings_as_lines
from dcae.utils.cliargs import add_batch_size, add_device, add_dtype, add_output, add_overwrite, number_type
from dcae.utils.numbers import MINUTES


# ----------------------------------------------------------------------------- shared options
def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="zoo name (see `dcae models`), Hub id, local folder (original or diffusers format) or weight file",
    )
    p.add_argument("--model-name", help="zoo configuration for a bare weight file whose shapes are ambiguous")
    add_runtime_args(p)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    add_device(p)
    add_dtype(p, "compute")
    add_batch_size(p, 4, "images per forward pass")
    p.add_argument("--tile", action="store_true", help="tiled encode/decode for very large images")


def load_model_from_args(args: argparse.Namespace):
    from dcae.models import DCAE
    from dcae.utils.devices import resolve_device, resolve_dtype

    with non_finite_warnings_as_lines():  # NaN weights: one line naming the tensor; outputs are checked by file
        model = DCAE.from_pretrained(args.model, model_name=args.model_name)
    model.to(device=resolve_device(args.device), dtype=resolve_dtype(args.dtype)).eval()
    if getattr(args, "tile", False):
        if not hasattr(model, "enable_tiling"):
            raise UserError("this build has no tiled path")
        model.enable_tiling()
    return model


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=total < 2, dynamic_ncols=True)


def _expand_inputs(inputs: list[str]) -> list[Path]:
    from dcae.data.images import find_images

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = find_images(p)
            if not found:
                print(f"dcae: warning: no image files in the folder {p}", file=sys.stderr)
            paths += found
        else:
            paths.append(p)  # missing files are reported when they are read
    return paths


def _check_input_links(images: list[str], model: str | None) -> None:
    """Before any model is loaded: an input given as a link to a missing file is one error line naming it
    (a missing image file is reported with the others when it is read); so is a --model path that is one."""
    from dcae.utils.io import check_input

    for item in images:
        check_input(item, "input", must_exist=False)
    if model is not None:
        check_input(model, "--model", must_exist=False)  # may be a zoo name or Hub id


def _check_outputs_free(files: list[Path], overwrite: bool) -> None:
    """Refuse before any work, not after the first images are done."""
    from dcae.utils.io import check_writable

    if not overwrite:
        for f in files:
            check_writable(f)


def _summary_exit(done: int, problems, total: int, what: str) -> int:
    if problems:
        print(f"dcae: {len(problems)} of {total} images got no {what} (see the messages above)", file=sys.stderr)
    return 1 if problems or not done else 0


# ----------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from dcae.diffusion.c2i.released.models import print_released_table, released_rows
    from dcae.models import get_config, list_models
    from dcae.models.config import model_aliases

    rows, aliases = [], {}
    for name in list_models():
        c = get_config(name)
        aliases[name] = model_aliases(name)  # other published names (each loads with its own Hub home)
        shape = f"f{c.spatial_compression}c{c.latent_channels}"
        rows.append((name, shape, f"{c.scaling_factor:g}", c.hub_id or "", ", ".join(aliases[name])))
    if args.json:
        keys = ("name", "shape", "scaling_factor", "hub_id")
        records = [{**dict(zip(keys, r)), "aliases": aliases[r[0]]} for r in rows]
        print(json.dumps(records + released_rows(), indent=2))
        return 0
    header = ("name", "latent", "scaling", "hub", "aliases")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    for r in [header] + rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print()
    print_released_table()  # the released diffusion models on these autoencoders
    return 0


# ----------------------------------------------------------------------------- encode / decode
def cmd_encode(args: argparse.Namespace) -> int:
    import torch

    from dcae.data.batches import Problems, load_batch, plan, run_per_image_on_failure
    from dcae.models.finite import checked_by_caller
    from dcae.utils.io import check_output_file

    out = check_output_file(args.output, args.overwrite, "output file (-o)")
    _check_input_links(args.images, args.model)
    paths = _expand_inputs(args.images)
    if not paths:
        raise UserError("no input images")
    model = load_model_from_args(args)
    device = next(model.parameters()).device
    problems = Problems()
    order = {p: i for i, p in enumerate(paths)}
    encoded: list[tuple[int, dict, torch.Tensor]] = []
    batches = plan(paths, args.batch_size, problems)
    bar = _progress(range(sum(map(len, batches))), sum(map(len, batches)), "encode")
    with torch.inference_mode(), checked_by_caller(model):
        for batch in batches:
            for names, x in load_batch(batch, problems):
                step = run_per_image_on_failure(
                    lambda t: model.encode(t.to(device)).float().cpu(), names, x, "encode", problems
                )
                for done, _, z in step:
                    for path, zi in zip(done, z):
                        if not torch.isfinite(zi).all():
                            problems.failed_file(
                                path, "the encoder produced NaN/Inf latents (non-finite model output); not written"
                            )
                            continue
                        record = {"file": str(path), "height": x.shape[-2], "width": x.shape[-1]}
                        encoded.append((order[path], record, model.scale_latents(zi) if args.scaled else zi))
            bar.update(len(batch))
    bar.close()
    if not encoded:
        raise UserError(f"none of the {len(paths)} input images could be encoded")
    _write_latents(sorted(encoded, key=lambda e: e[0]), out, model, args)
    return _summary_exit(len(encoded), problems, len(paths), "latents")


def _write_latents(encoded: list, out: Path, model, args: argparse.Namespace) -> None:
    from dcae.utils.io import atomic_save_safetensors

    tensors, records = {}, []
    for _, record, z in encoded:
        key = f"latent_{len(records):06d}"
        tensors[key] = z
        records.append({"key": key, **record})
    model_ref = Path(args.model).resolve() if Path(args.model).exists() else args.model
    meta = {
        "model": str(model_ref),
        "model_name": model.config.name,
        "scaling_factor": model.config.scaling_factor,
        "scaled": bool(args.scaled),
        "spatial_compression": model.spatial_compression,
        "images": records,
    }
    atomic_save_safetensors(tensors, out, metadata={"dcae": json.dumps(meta)})
    print(f"wrote {len(records)} latents to {out}")


def read_latents(path: str | Path):
    """(tensors, metadata) of a file written by `dcae encode`; clear errors for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta_text = (f.metadata() or {}).get("dcae")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:
        raise UserError(f"cannot read latents from {path}: {exc}") from exc
    if meta_text is None:
        raise UserError(f"{path} has no dcae metadata (was it written by `dcae encode`?)")
    return tensors, _parse_latents_meta(path, meta_text)


def _parse_latents_meta(path: Path, text: str) -> dict:
    """The metadata of a latents file, checked enough that decoding cannot stop on a missing field."""

    try:
        meta = json.loads(text)
        _require(isinstance(meta, dict), "not a JSON object")
        _require(isinstance(meta.get("images"), list), "images: not a list")
        for i, rec in enumerate(meta["images"]):
            _require(isinstance(rec, dict), f"images[{i}]: not an object")
            for field in ("key", "file"):
                _require(isinstance(rec.get(field), str) and rec[field] != "", f"images[{i}].{field}: not a name")
            for field in ("height", "width"):
                v = rec.get(field)
                _require(type(v) is int and 1 <= v <= 2**20, f"images[{i}].{field}: not a size in pixels: {v!r}")
        for field in ("model", "model_name"):
            _require(meta.get(field) is None or isinstance(meta[field], str), f"{field}: not a name")
        _require(isinstance(meta.get("scaled", False), bool), "scaled: not true or false")
        if meta.get("scaled"):
            sf = meta.get("scaling_factor")
            ok = isinstance(sf, (int, float)) and not isinstance(sf, bool) and math.isfinite(sf) and sf > 0
            _require(ok, f"scaling_factor: not a positive number: {sf!r}")
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        raise UserError(f"{path}: damaged dcae metadata ({type(exc).__name__}: {exc})") from None
    return meta


def _require(ok: bool, problem: str) -> None:
    if not ok:
        raise ValueError(problem)


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from dcae.data.batches import Problems, output_stems
    from dcae.models.finite import checked_by_caller
    from dcae.utils.io import check_input, check_output_dir

    check_input(args.latents, "latents file")
    check_output_dir(args.output, "output folder (-o)")
    _check_input_links([], args.model)
    tensors, meta = read_latents(args.latents)
    if args.model is None:
        from dcae.models import list_models

        args.model = meta["model"]
        if args.model_name is None and meta.get("model_name") in list_models():
            args.model_name = meta["model_name"]
    out_dir = Path(args.output)
    records = meta["images"]
    stems = output_stems([Path(r["file"]) for r in records])
    _check_outputs_free([out_dir / f"{stem}.png" for stem in stems.values()], args.overwrite)
    model = load_model_from_args(args)
    problems = Problems()
    done = 0
    with torch.inference_mode(), checked_by_caller(model):
        for rec in _progress(records, len(records), "decode"):
            done += _decode_one(model, tensors, rec, meta, out_dir / f"{stems[Path(rec['file'])]}.png", problems, args)
    print(f"wrote {done} images to {out_dir}")
    return _summary_exit(done, problems, len(records), "decoded image")


def _decode_one(model, tensors: dict, rec: dict, meta: dict, out: Path, problems, args) -> int:
    """Decode and write one record of a latents file; 1 if written, 0 if reported as a problem."""
    import torch

    from dcae.data.batches import one_line
    from dcae.data.images import save_image

    where = f"{args.latents}: {rec['key']}"
    z = tensors.get(rec["key"])
    if z is None:
        problems.failed_file(Path(rec["file"]), f"{where} is missing from the file; skipped")
        return 0
    if not torch.isfinite(z).all():
        problems.failed_file(Path(rec["file"]), f"{where} contains NaN/Inf latents; skipped")
        return 0
    z = z[None].to(next(model.parameters()).device)
    if meta.get("scaled"):
        z = z / meta["scaling_factor"]
    try:
        x = model.decode(z)[..., : rec["height"], : rec["width"]]
    except Exception as exc:
        problems.failed_file(Path(rec["file"]), f"decode of {where} failed ({one_line(exc)}); skipped")
        return 0
    if not torch.isfinite(x).all():
        problems.failed_file(
            Path(rec["file"]), f"decoding {where} gave NaN/Inf pixels (non-finite model output); not written"
        )
        return 0
    save_image(x[0], out)
    return 1


# ----------------------------------------------------------------------------- reconstruct
def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from dcae.data.batches import Problems, load_batch, output_stems, plan, run_per_image_on_failure
    from dcae.models.finite import checked_by_caller
    from dcae.utils.io import check_output_dir, check_output_file

    out_dir = check_output_dir(args.output, "output folder (-o)")
    if args.json:
        check_output_file(args.json, args.overwrite, "--json file")
    _check_input_links(args.images, args.model)
    paths = _expand_inputs(args.images)
    if not paths:
        raise UserError("no input images")
    stems = output_stems(paths)
    outputs = [out_dir / f"{stem}{suffix}.png" for stem in stems.values() for suffix in ("", "_side_by_side")]
    _check_outputs_free(outputs + ([Path(args.json)] if args.json else []), args.overwrite)
    model = load_model_from_args(args)
    device = next(model.parameters()).device
    problems = Problems()
    results: list[dict] = []
    batches = plan(paths, args.batch_size, problems)
    bar = _progress(range(sum(map(len, batches))), sum(map(len, batches)), "reconstruct")

    def encode_decode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = model.encode(x.to(device))
        latent_ok = torch.isfinite(z).flatten(1).all(1).cpu()
        return latent_ok, model.decode(z)[..., : x.shape[-2], : x.shape[-1]].float().cpu()

    with torch.inference_mode(), checked_by_caller(model):
        for batch in batches:
            for names, x in load_batch(batch, problems):
                for done, xs, (latent_ok, rec) in run_per_image_on_failure(
                    encode_decode, names, x, "reconstruct", problems
                ):
                    for path, img, ok, r in zip(done, xs, latent_ok, rec):
                        row = _write_reconstruction(path, img, r, bool(ok), out_dir / stems[path], problems)
                        if row is not None:
                            results.append(row)
            bar.update(len(batch))
    bar.close()
    _report_reconstruction(results, problems, args)
    return _summary_exit(len(results), problems, len(paths), "reconstruction")


def _write_reconstruction(path: Path, img, r, latent_ok: bool, stem: Path, problems) -> dict | None:
    """Write the reconstruction and the side-by-side first, then the metrics, each in a guard: a
    metric that fails for this image costs only that number. None when nothing could be written."""
    import torch
    from tqdm import tqdm

    from dcae.data.images import save_image, tensor_to_uint8

    if not latent_ok or not torch.isfinite(r).all():
        what = "latents contain" if not latent_ok else "reconstruction contains"
        problems.failed_file(path, f"the {what} NaN/Inf (non-finite model output); nothing written")
        return None
    a, b = tensor_to_uint8(img), tensor_to_uint8(r)
    out = save_image(b, stem.with_name(stem.name + ".png"))
    side = save_image(side_by_side(a, b), stem.with_name(stem.name + "_side_by_side.png"))
    row = {"file": str(path), "output": str(out), "side_by_side": str(side), **_guarded_metrics(a, b)}
    note = f"  ({row['metric_note']})" if "metric_note" in row else ""
    tqdm.write(f"{path}: PSNR {_fmt(row['psnr'], '.2f')} dB  SSIM {_fmt(row['ssim'], '.4f')}{note}")
    if row.get("metric_note", "").startswith("metrics failed"):
        tqdm.write(f"dcae: {path}: {row['metric_note']} (the reconstruction is written)", file=sys.stderr)
    return row


def side_by_side(a, b, padding: int = 2):
    """[a | b] of two HxWx3 uint8 arrays on white, laid out like `make_grid([a, b], nrow=2)`; in uint8, so
    that a large image costs 1/4 of the float grid's memory."""
    import numpy as np

    h, w = a.shape[:2]
    grid = np.full((h + 2 * padding, 2 * w + 3 * padding, 3), 255, np.uint8)
    grid[padding : padding + h, padding : padding + w] = a
    grid[padding : padding + h, 2 * padding + w : 2 * padding + 2 * w] = b
    return grid


def _guarded_metrics(a, b) -> dict:
    """PSNR/SSIM of one pair; a metric that fails or does not apply is None with a note why."""
    from dcae.data.batches import one_line

    try:
        psnr, ssim = image_psnr_ssim(a, b)
    except Exception as exc:  # MemoryError included: the reconstruction is already written
        return {"psnr": None, "ssim": None, "metric_note": f"metrics failed: {one_line(exc)}"}
    row: dict = {"psnr": None if math.isnan(psnr) else psnr, "ssim": None if math.isnan(ssim) else ssim}
    missing = [k.upper() for k in ("psnr", "ssim") if row[k] is None]
    if missing:
        row["metric_note"] = f"{' and '.join(missing)} n/a for a {a.shape[1]}x{a.shape[0]} px image"
    return row


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _report_reconstruction(results: list[dict], problems, args) -> None:
    """The mean line and the JSON file (written whenever asked for, whatever failed)."""
    from dcae.utils.io import atomic_write_json

    psnr, ssim = _mean([r["psnr"] for r in results]), _mean([r["ssim"] for r in results])
    if results:
        n_psnr, n_ssim = (sum(r[k] is not None for r in results) for k in ("psnr", "ssim"))
        print(f"mean over {len(results)} images: PSNR {_fmt(psnr, '.2f')} dB ({n_psnr} images)  "
              f"SSIM {_fmt(ssim, '.4f')} ({n_ssim} images)")  # fmt: skip
    if args.json:
        finite = lambda v: v if v is None or math.isfinite(v) else None  # noqa: E731 (JSON has no inf)
        rows = [{**r, "psnr": finite(r["psnr"])} for r in results]
        summary = {"model": str(args.model), "psnr": finite(psnr), "ssim": ssim, "images": rows}
        atomic_write_json(
            args.json, {**summary, "failed": problems.files(), "errors": problems.unreadable + problems.failed}
        )


def image_psnr_ssim(a, b) -> tuple[float, float]:
    """`dcae.metrics.psnr_ssim.image_psnr_ssim`, imported when first used (`dcae --help` stays fast)."""
    from dcae.metrics.psnr_ssim import image_psnr_ssim as metric

    return metric(a, b)


# ----------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from dcae.models import DCAE
    from dcae.models.weights import DIFFUSERS_WEIGHTS, ORIGINAL_WEIGHTS
    from dcae.utils.io import check_input, check_output_dir, check_output_file

    check_input(args.src, "source", must_exist=False)  # may be a Hub id
    check_output_dir(args.dst, "output folder")
    weights = ORIGINAL_WEIGHTS if args.format == "original" else DIFFUSERS_WEIGHTS
    check_output_file(Path(args.dst) / weights, args.overwrite, "output weights")
    model = DCAE.from_pretrained(args.src, model_name=args.model_name)
    out = model.save_pretrained(args.dst, format=args.format, overwrite=args.overwrite)
    print(f"wrote {model.config.name} in the {args.format} format to {out}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from dcae.models.demo import run_demo
    from dcae.utils.io import check_input, check_output_dir

    check_output_dir(args.out, "--out folder")
    check_input(args.model, "--model", must_exist=False)
    run_demo(Path(args.out), model=args.model, minutes=args.minutes)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the released DC-AE configurations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("encode", help="encode images to a latents .safetensors file")
    p.add_argument("images", nargs="+", help="image files or folders")
    add_output(p, "output .safetensors file")
    p.add_argument("--scaled", action="store_true", help="store latents multiplied by the scaling factor")
    add_overwrite(p, "replace an existing output file")
    add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode a latents file written by `dcae encode` to PNG images")
    p.add_argument("latents")
    add_output(p, "output folder")
    add_overwrite(p, "replace existing images")
    add_model_args(p, required=False)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="encode+decode images; write reconstructions, side-by-sides, PSNR/SSIM")
    p.add_argument("images", nargs="+", help="image files or folders")
    add_output(p, "output folder")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    add_overwrite(p, "replace existing output files")
    add_model_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("convert", help="convert weights between the original and diffusers formats")
    p.add_argument("src", help="Hub id, folder or weight file")
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", required=True, choices=["original", "diffusers"])
    p.add_argument("--model-name", help="zoo configuration for a bare weight file")
    add_overwrite(p, "replace existing weights in the output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "demo", help="reconstruct offline photos (released weights if available, else train a small model)"
    )
    p.add_argument("--out", default="demo_out", help="output folder")
    p.add_argument("--model", default="dc-ae-f32c32-sana-1.1", help="released model to try first")
    p.add_argument("--minutes", type=number_type(MINUTES, "minutes", "time budgets in minutes"), default=4.0,
                   help="CPU training budget of the offline path")  # fmt: skip
    p.set_defaults(func=cmd_demo)
