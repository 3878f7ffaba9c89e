"""Text-to-image commands: `dcae t2i cache`, `train`, `sample`, `export` and `eval` (dcae.diffusion.t2i.eval).

    dcae t2i cache --data photos/ --model dc-ae-f32c32-sana-1.1 --text-encoder google/gemma-2-2b-it -o cache/
    dcae t2i train configs/t2i_tiny.yaml data=cache/ out_dir=runs/t2i
    dcae t2i sample --ckpt runs/t2i --prompt "a red square" -o samples/
    dcae t2i export --ckpt runs/t2i -o pipeline/      # diffusers' SanaPipeline.from_pretrained("pipeline/")
    dcae t2i sample --model Efficient-Large-Model/Sana_600M_512px_diffusers --prompt "a cat" -o cats/

Handlers import torch and the models lazily so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcae.diffusion.t2i.sampling import add_sampling_options, check_model_source, check_size_fits, generate_images
from dcae.errors import UserError
from dcae.utils import numbers
from dcae.utils.cliargs import (
    add_batch_size,
    add_device,
    add_dtype,
    add_output,
    add_overwrite,
    add_solver,
    flow_shift,
    nonnegative_int,
    number_type,
    positive_int,
    with_checks,
)
from dcae.utils.sizes import check_images_fit


# ----------------------------------------------------------------------------- dcae t2i cache
def cmd_cache(args: argparse.Namespace) -> int:
    from dcae.diffusion.t2i.cache import extract_text_latents
    from dcae.diffusion.t2i.encoders import TextEncoder
    from dcae.models import DCAE
    from dcae.utils.devices import resolve_device, resolve_dtype
    from dcae.utils.io import check_input, check_output_dir

    check_output_dir(args.output, "output folder (-o)")
    for source in args.data:
        check_input(source, "--data", must_exist=False)  # may be a glob or a {000..009} pattern
    check_input(args.model, "--model", must_exist=False)
    check_input(args.text_encoder, "--text-encoder", must_exist=False)
    device = resolve_device(args.device)
    encoder = TextEncoder.from_pretrained(args.text_encoder, dtype=args.text_dtype, device=device,
                                          max_tokens=args.max_tokens)  # fmt: skip
    autoencoder = DCAE.from_pretrained(args.model)
    index = extract_text_latents(
        autoencoder, encoder, args.data, args.output, model_name=args.model, resolution=args.resolution,
        patch_size=args.patch_size, batch_size=args.batch_size, shard_size=args.shard_size, device=device,
        dtype=resolve_dtype(args.dtype), overwrite=args.overwrite,
    )  # fmt: skip
    c = index.conditioning
    skipped = f", {index.skipped_count} input(s) skipped (listed in index.json)" if index.skipped_count else ""
    print(f"{index.num_images} captioned images in {len(index.buckets)} bucket(s) {index.buckets} latents, "
          f"{c.max_tokens} x {c.caption_channels} text embeddings{skipped}: {args.output}")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------- dcae t2i sample
def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt (each given once) or --prompts FILE (one per line; blank lines and # comments skipped)."""
    if bool(args.prompt) == bool(args.prompts):
        raise UserError("give prompts with --prompt TEXT (repeatable) or --prompts FILE, one of the two")
    if args.prompt:
        empty = [i for i, p in enumerate(args.prompt) if not p.strip()]
        if empty:
            raise UserError(f"--prompt number {empty[0] + 1} is empty (the empty prompt is the unconditional one)")
        return [p.strip() for p in args.prompt]
    path = Path(args.prompts)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read prompts from {path}: {exc}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{path} holds no prompts (one per line)")
    return prompts


def cmd_sample(args: argparse.Namespace) -> int:
    from dcae.utils.io import check_output_dir

    check_output_dir(args.output, "output folder (-o)")
    check_model_source(args)
    prompts = read_prompts(args)
    n = len(prompts) * args.per_prompt
    values = [prompts[i // args.per_prompt] for i in range(n)]
    out = Path(args.output)
    paths, settings, rank = generate_images(args, values, out, stale=("grid.png", "samples.json"))
    if rank == 0:
        _report(args, out, paths, values, settings)
    return 0


def _report(args, out: Path, paths: list[Path], prompts: list[str], settings: dict) -> None:
    from dcae.data.images import load_image, make_grid, save_image
    from dcae.utils.io import atomic_write_json

    k = min(len(paths), args.grid)
    if k:
        save_image(make_grid([load_image(p) for p in paths[:k]], nrow=min(8, k)), out / "grid.png")
    atomic_write_json(out / "samples.json", {**settings, "prompts": prompts, "images": [p.name for p in paths]})
    print(f"{len(paths)} samples in {out / 'images'}" + (f", grid {out / 'grid.png'}" if k else ""))


# ----------------------------------------------------------------------------- dcae t2i export
def cmd_export(args: argparse.Namespace) -> int:
    from dcae.diffusion.t2i.pipeline import export_pipeline
    from dcae.utils.io import check_input, check_output_dir

    check_input(args.ckpt, "--ckpt")
    check_output_dir(args.output, "output folder (-o)")
    if args.lora:
        from dcae.diffusion.t2i.lora_io import export_lora

        path = export_lora(args.ckpt, args.output, overwrite=args.overwrite, use_ema=not args.no_ema)
        print(f"diffusers SANA LoRA: {path} (SanaPipeline.load_lora_weights, or dcae t2i sample --lora)")
        return 0
    folder = export_pipeline(args.ckpt, args.output, overwrite=args.overwrite, solver=args.solver, shift=args.shift,
                             use_ema=not args.no_ema)  # fmt: skip
    print(f"diffusers SANA pipeline: {folder} (diffusers.SanaPipeline.from_pretrained, or dcae t2i sample --model)")
    return 0


# ----------------------------------------------------------------------------- dcae t2i adapt
def cmd_adapt(args: argparse.Namespace) -> int:
    from dcae.diffusion.t2i.adapt import cmd_adapt as run

    return run(args)


# ----------------------------------------------------------------------------- the parser
def _cache_fits(args: argparse.Namespace) -> None:
    """A batch of images at the bucket resolution (about R^2 pixels each) fits in memory, or one line now."""
    r = args.resolution
    check_images_fit(r, r, args.batch_size, args.device, f"--resolution {r}")


def _sample_fits(args: argparse.Namespace) -> None:
    check_size_fits(args, len(args.prompt) * args.per_prompt if args.prompt else None)


def register(sub: argparse._SubParsersAction) -> None:
    from dcae.diffusion.commands import add_consolidate, add_train_arguments
    from dcae.diffusion.solvers import EXPORT_SOLVERS

    p = sub.add_parser("t2i", help="text-to-image on DC-AE latents: cache, train, sample (SANA-style)")
    tsub = p.add_subparsers(dest="t2i_command", metavar="WHAT")
    c = tsub.add_parser("cache", help="precompute DC-AE latents (resolution buckets) and text embeddings")
    c.add_argument("--data", nargs="+", required=True,
                   help="folders with sidecar captions, JSONL/CSV manifests, webdataset .tar")  # fmt: skip
    c.add_argument("--model", required=True, help="autoencoder: zoo name, Hub id, local folder or weight file")
    c.add_argument("--text-encoder", required=True, help="Hub id or folder (Gemma-2, T5, Qwen2, CLIP, BERT-like)")
    add_output(c, "output folder; reruns resume")
    c.add_argument("--resolution", type=positive_int, default=512,
                   help="bucket base resolution R: every image is resized (up or down) to a bucket of about R^2 "
                   "pixels")  # fmt: skip
    c.add_argument("--patch-size", type=number_type(numbers.PATCH_SIZE, "patch_size", "patch sizes"), default=1,
                   help="the network's patch size (bucket sizes divide by f*p)")  # fmt: skip
    c.add_argument("--max-tokens", type=number_type(numbers.TOKENS, "tokens", "tokens per prompt"),
                   help="tokens per prompt (default 300, as SANA; CLIP: 77)")  # fmt: skip
    add_batch_size(c, 16, "images (and their captions) per encoding batch")
    c.add_argument("--shard-size", type=positive_int, default=1024, help="latents per shard file")
    add_device(c)
    add_dtype(c, "autoencoder")
    add_dtype(c, "text encoder", flag="--text-dtype")
    add_overwrite(c, "replace a cache of another plan")
    c.set_defaults(func=with_checks(cmd_cache, _cache_fits))

    t = tsub.add_parser("train", help="train a SANA-style model on a `dcae t2i cache` folder (resumes)",
                        description="dcae t2i train CONFIG.yaml [key=value ...]: the diffusion trainer on text "
                        "latents (see configs/t2i_tiny.yaml)")  # fmt: skip
    add_train_arguments(t, "YAML config")
    add_consolidate(tsub)

    a = tsub.add_parser("adapt", help="DC-Gen: move a text-to-image model onto a deeper autoencoder (3 stages)",
                        description="dcae t2i adapt CONFIG.yaml [key=value ...]: embedding alignment, embedder + "
                        "head, LoRA end to end, merge (see dcae.diffusion.t2i.adapt); resumes")  # fmt: skip
    add_train_arguments(a, "YAML config (teacher, teacher_data, data, out_dir, stage steps)")
    a.set_defaults(func=cmd_adapt)

    e = tsub.add_parser("export", help="a diffusers SANA pipeline folder from a text-to-image run of ours")
    e.add_argument("--ckpt", required=True, help="run folder or checkpoint")
    add_output(e, "the pipeline folder")
    add_solver(e, EXPORT_SOLVERS, default="euler", what="its scheduler")
    e.add_argument("--shift", type=flow_shift, default=1.0, help="the scheduler's flow shift (> 0; 1: none)")
    e.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    e.add_argument("--lora", action="store_true",
                   help="a LoRA run: only its adapters, as diffusers' pytorch_lora_weights.safetensors (default: "
                   "the whole pipeline with the adapters merged)")  # fmt: skip
    add_overwrite(e, "replace an existing pipeline folder")
    e.set_defaults(func=cmd_export)

    s = tsub.add_parser("sample", help="images from prompts with a text-to-image model")
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts", help="a file with one prompt per line")
    add_output(s, "output folder: images/, grid.png, samples.json")
    s.add_argument("--per-prompt", type=positive_int, default=1, help="images per prompt")
    s.add_argument("--grid", type=nonnegative_int, default=16, help="images in grid.png (0: none)")
    add_sampling_options(s)
    s.set_defaults(func=with_checks(cmd_sample, _sample_fits))

    from dcae.diffusion.t2i.eval import add_eval_parser

    add_eval_parser(tsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)
