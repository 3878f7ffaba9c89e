"""Autoencoder commands: `dcae models | encode | decode | reconstruct | convert | demo`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps (default: auto)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (default fp32)")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--tile", action="store_true", help="tiled encode/decode for very large images")


def load_model_from_args(args: argparse.Namespace):
    from dcae.models import DCAE
    from dcae.utils.runtime import resolve_device, resolve_dtype

    model = DCAE.from_pretrained(args.model, model_name=args.model_name)
    model.to(device=resolve_device(args.device), dtype=resolve_dtype(args.dtype)).eval()
    if getattr(args, "tile", False):
        if not hasattr(model, "enable_tiling"):
            from dcae.errors import UserError

            raise UserError("this build has no tiled path")
        model.enable_tiling()
    return model


def _progress(iterable, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=total < 2, dynamic_ncols=True)


def _load_images(paths: list[Path]):
    """(path, tensor) for readable files; unreadable ones are reported by name and counted."""
    from dcae.data.images import ImageReadError, load_image

    ok, failed = [], []
    for path in paths:
        try:
            ok.append((path, load_image(path)))
        except (ImageReadError, FileNotFoundError) as exc:
            print(f"dcae: skipping {path}: {exc}", file=sys.stderr)
            failed.append(path)
    return ok, failed


def _expand_inputs(inputs: list[str]) -> list[Path]:
    from dcae.data.images import find_images

    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += find_images(p)
        else:
            paths.append(p)  # missing files are reported when they are read
    return paths


def _by_size(items):
    """Group (path, image) by image size so that each batch stacks."""
    groups: dict[tuple[int, int], list] = {}
    for path, img in items:
        groups.setdefault(tuple(img.shape[-2:]), []).append((path, img))
    return groups


# ----------------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from dcae.diffusion.released import print_released_table, released_rows
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

    from dcae.errors import UserError
    from dcae.utils.io import atomic_save_safetensors, check_writable

    out = check_writable(args.output, args.overwrite)
    paths = _expand_inputs(args.images)
    if not paths:
        raise UserError("no input images")
    model = load_model_from_args(args)
    device = next(model.parameters()).device
    items, failed = _load_images(paths)
    tensors: dict[str, torch.Tensor] = {}
    records = []
    bar = _progress(range(len(items)), len(items), "encode")
    with torch.inference_mode():
        for (h, w), group in _by_size(items).items():
            for start in range(0, len(group), args.batch_size):
                chunk = group[start : start + args.batch_size]
                x = torch.stack([img for _, img in chunk]).to(device)
                z = model.encode(x).float()
                if args.scaled:
                    z = model.scale_latents(z)
                for (path, _), zi in zip(chunk, z):
                    key = f"latent_{len(records):06d}"
                    tensors[key] = zi.cpu()
                    records.append({"key": key, "file": str(path), "height": h, "width": w})
                bar.update(len(chunk))
    bar.close()
    if not records:
        raise UserError("none of the input images could be read")
    for key, z in tensors.items():
        if not torch.isfinite(z).all():
            raise UserError(f"{key} ({records[int(key[7:])]['file']}): the encoder produced NaN/Inf latents")
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
    return 1 if failed else 0


def read_latents(path: str | Path):
    """(tensors, metadata) of a file written by `dcae encode`; clear errors for anything else."""
    from safetensors import safe_open

    from dcae.errors import UserError

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
    return tensors, json.loads(meta_text)


def cmd_decode(args: argparse.Namespace) -> int:
    import torch

    from dcae.data.images import save_image
    from dcae.errors import NonFiniteError

    tensors, meta = read_latents(args.latents)
    if args.model is None:
        from dcae.models import list_models

        args.model = meta["model"]
        if args.model_name is None and meta.get("model_name") in list_models():
            args.model_name = meta["model_name"]
    model = load_model_from_args(args)
    device = next(model.parameters()).device
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    bar = _progress(meta["images"], len(meta["images"]), "decode")
    with torch.inference_mode():
        for rec in bar:
            z = tensors[rec["key"]][None].to(device)
            if not torch.isfinite(z).all():
                raise NonFiniteError(f"{args.latents}: {rec['key']} ({rec['file']}) contains NaN/Inf values")
            if meta.get("scaled"):
                z = z / meta["scaling_factor"]
            x = model.decode(z)[..., : rec["height"], : rec["width"]]
            save_image(x[0], out_dir / f"{Path(rec['file']).stem}.png", overwrite=args.overwrite)
    print(f"wrote {len(meta['images'])} images to {out_dir}")
    return 0


# ----------------------------------------------------------------------------- reconstruct
def cmd_reconstruct(args: argparse.Namespace) -> int:
    import torch

    from dcae.data.images import make_grid, save_image, tensor_to_uint8
    from dcae.errors import UserError
    from dcae.utils.io import atomic_write_json

    paths = _expand_inputs(args.images)
    if not paths:
        raise UserError("no input images")
    out_dir = Path(args.output)
    model = load_model_from_args(args)
    device = next(model.parameters()).device
    items, failed = _load_images(paths)
    results = []
    bar = _progress(range(len(items)), len(items), "reconstruct")
    with torch.inference_mode():
        for _, group in _by_size(items).items():
            for start in range(0, len(group), args.batch_size):
                chunk = group[start : start + args.batch_size]
                x = torch.stack([img for _, img in chunk]).to(device)
                rec = model.reconstruct(x).float().cpu()
                for (path, img), r in zip(chunk, rec):
                    a, b = tensor_to_uint8(img), tensor_to_uint8(r)
                    psnr, ssim = image_psnr_ssim(a, b)
                    stem = Path(path).stem
                    save_image(b, out_dir / f"{stem}.png", overwrite=args.overwrite)
                    side = make_grid([img, r.clamp(-1, 1)], nrow=2)
                    save_image(side, out_dir / f"{stem}_side_by_side.png", overwrite=args.overwrite)
                    results.append({"file": str(path), "psnr": psnr, "ssim": ssim})
                    bar.write(f"{path}: PSNR {psnr:.2f} dB  SSIM {ssim:.4f}")
                bar.update(len(chunk))
    bar.close()
    if results:
        mean_psnr = sum(r["psnr"] for r in results) / len(results)
        mean_ssim = sum(r["ssim"] for r in results) / len(results)
        print(f"mean over {len(results)} images: PSNR {mean_psnr:.2f} dB  SSIM {mean_ssim:.4f}")
        if args.json:
            summary = {"model": str(args.model), "psnr": mean_psnr, "ssim": mean_ssim, "images": results}
            atomic_write_json(args.json, {**summary, "failed": [str(p) for p in failed]})
    if failed:
        print(f"dcae: {len(failed)} of {len(paths)} images could not be read", file=sys.stderr)
    return 1 if failed or not results else 0


def image_psnr_ssim(a, b) -> tuple[float, float]:
    """PSNR (dB) and SSIM of two HxWx3 uint8 images, as the evaluation protocol computes them, in
    bounded memory at any size. PSNR is +inf for identical images; SSIM is NaN (not defined) for an
    image with a side below 6 px."""
    from dcae.metrics.psnr_ssim import psnr_per_image, ssim_per_image

    return float(psnr_per_image(a, b)[0]), float(ssim_per_image(a, b)[0])


# ----------------------------------------------------------------------------- convert
def cmd_convert(args: argparse.Namespace) -> int:
    from dcae.models import DCAE

    model = DCAE.from_pretrained(args.src, model_name=args.model_name)
    out = model.save_pretrained(args.dst, format=args.format, overwrite=args.overwrite)
    print(f"wrote {model.config.name} in the {args.format} format to {out}")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from dcae.demo import run_demo

    run_demo(Path(args.out), model=args.model, minutes=args.minutes)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the released DC-AE configurations")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("encode", help="encode images to a latents .safetensors file")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--scaled", action="store_true", help="store latents multiplied by the scaling factor")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="decode a latents file written by `dcae encode` to PNG images")
    p.add_argument("latents")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p, required=False)
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("reconstruct", help="encode+decode images; write reconstructions, side-by-sides, PSNR/SSIM")
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--json", help="also write the numbers to this JSON file")
    p.add_argument("--overwrite", action="store_true")
    add_model_args(p)
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("convert", help="convert weights between the original and diffusers formats")
    p.add_argument("src", help="Hub id, folder or weight file")
    p.add_argument("dst", help="output folder")
    p.add_argument("--format", required=True, choices=["original", "diffusers"])
    p.add_argument("--model-name", help="zoo configuration for a bare weight file")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "demo", help="reconstruct offline photos (released weights if available, else train a small model)"
    )
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p.add_argument("--model", default="dc-ae-f32c32-sana-1.1", help="released model to try first")
    p.add_argument("--minutes", type=float, default=4.0, help="CPU training budget of the offline path")
    p.set_defaults(func=cmd_demo)
