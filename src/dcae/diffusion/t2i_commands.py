"""Text-to-image commands: `dcae t2i cache`, `train`, `sample`, `export` and `eval` (dcae.diffusion.t2i_eval).

    dcae t2i cache --data photos/ --model dc-ae-f32c32-sana-1.1 --text-encoder google/gemma-2-2b-it -o cache/
    dcae t2i train configs/t2i_tiny.yaml data=cache/ out=runs/t2i
    dcae t2i sample --ckpt runs/t2i --prompt "a red square" -o samples/
    dcae t2i export --ckpt runs/t2i -o pipeline/      # diffusers' SanaPipeline.from_pretrained("pipeline/")
    dcae t2i sample --model Efficient-Large-Model/Sana_600M_512px_diffusers --prompt "a cat" -o cats/

Handlers import torch and the models lazily so that `dcae --help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dcae.errors import UserError
from dcae.utils.cliargs import IntermixedParser


# ----------------------------------------------------------------------------- dcae t2i cache
def cmd_cache(args: argparse.Namespace) -> int:
    from dcae.diffusion.text_encoders import TextEncoder
    from dcae.diffusion.text_latents import extract_text_latents
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
    buckets = sorted({tuple(s["bucket"]) for s in index["shards"]})
    print(f"{index['num_images']} captioned images in {len(buckets)} bucket(s) {buckets} latents, "
          f"{index['max_tokens']} x {index['caption_channels']} text embeddings: {args.output}")  # fmt: skip
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
    paths, settings, rank = generate_images(args, values, out)
    if rank == 0:
        _report(args, out, paths, values, settings)
    return 0


def check_model_source(args: argparse.Namespace) -> None:
    """Exactly one of --ckpt / --model, and it is not a link to nothing."""
    from dcae.utils.io import check_input

    if bool(args.ckpt) == bool(args.model):
        raise UserError("pass --ckpt (a text-to-image run or checkpoint of ours) or --model (a SANA pipeline)")
    check_input(args.ckpt or args.model, "--ckpt" if args.ckpt else "--model", must_exist=bool(args.ckpt))


def generate_images(args: argparse.Namespace, values: list[str], out: Path) -> tuple[list[Path], dict, int]:
    """Image i of prompt values[i] -> out/images/%06d.png, the missing ones only (unless --overwrite), split
    across processes. Returns every path, the settings and this process's rank."""
    import torch

    from dcae.diffusion.generation import ImageSampler, write_samples
    from dcae.diffusion.processes.sampling import sample
    from dcae.utils.devices import process_group_from_env

    rank, world, device = process_group_from_env(args.device)
    m = _load_for_sampling(args, device)
    size = _latent_size(args.size, m["resolution"], m["compression"], m["patch"])
    shape = (m["model"].in_channels, *size)

    def latents(noise, batch_prompts: list[str], seeds: list[int], generators):
        cond = m["encoder"].encode(batch_prompts)
        cond = type(cond)(cond.emb.float(), cond.mask, cond.null_emb.float(), cond.null_mask).to(device)
        return sample(m["model"], m["process"], noise, cond, steps=args.steps, solver=m["solver"],
                      cfg_scale=args.cfg, shift=args.shift if args.shift is not None else m["shift"],
                      generator=torch.Generator(device).manual_seed(seeds[0]))  # fmt: skip

    run = ImageSampler(latents, m["autoencoder"], m["scaling"], shape, args.seed, device, args.dtype)
    paths = write_samples(run.images, values, out, len(values), args.batch_size, args.overwrite, rank, world)
    return paths, {**m["settings"], "latent_shape": list(shape)}, rank


def _load_for_sampling(args, device) -> dict:
    """Network, process, text encoder, autoencoder and settings from one of our checkpoints or a pipeline."""
    from dcae.diffusion.conditioning import TextConditioning
    from dcae.diffusion.text_encoders import TextEncoder
    from dcae.diffusion.train.checkpoint import conditioning_of, load_checkpoint
    from dcae.models import DCAE

    if args.model:
        from dcae.diffusion.processes.flow import FlowMatching
        from dcae.diffusion.sana_pipeline import load_pipeline

        p = load_pipeline(args.model, device=device)

        model, encoder, ae, scaling = p.transformer.to(device).eval(), p.text_encoder, p.autoencoder, p.scaling_factor
        settings = {"model": str(args.model)}
        process, shift, resolution = FlowMatching(), p.shift, p.resolution
        defaults = {"solver": p.solver, "steps": p.steps, "cfg": p.guidance_scale}
    else:
        model, process, meta = load_checkpoint(args.ckpt, use_ema=not args.no_ema, device=device)
        conditioning, lat = conditioning_of(meta), meta["latents"] or {}
        if not isinstance(conditioning, TextConditioning):
            raise UserError(f"{meta['path']} is not a text-to-image model; sample it with `dcae sample`")
        source = args.text_encoder or lat.get("text_encoder")
        encoder = TextEncoder.from_pretrained(source, device=device, max_tokens=conditioning.max_tokens)
        if encoder.width != conditioning.caption_channels:
            raise UserError(f"text encoder {source} gives {encoder.width}-wide tokens; the model takes "
                            f"{conditioning.caption_channels} ({lat.get('text_encoder')})")  # fmt: skip
        ae = DCAE.from_pretrained(args.autoencoder or lat.get("model"))
        scaling, shift, resolution = float(lat.get("scaling_factor") or ae.scaling_factor), 1.0, lat.get("resolution")
        if args.autoencoder and abs(ae.scaling_factor - scaling) > 1e-6 * scaling:
            raise UserError(f"--autoencoder {args.autoencoder} has scaling factor {ae.scaling_factor:g}; the model "
                            f"was trained on latents scaled by {scaling:g} ({lat.get('model')})")  # fmt: skip
        settings = {"checkpoint": meta["path"], "step": meta["step"], "ema": not args.no_ema}
        defaults = {"solver": "euler", "steps": 20, "cfg": 4.5}
    if ae.latent_channels != model.in_channels:
        raise UserError(f"the autoencoder has {ae.latent_channels} latent channels, the model {model.in_channels}")
    solver = args.solver if args.solver != "auto" else defaults["solver"]
    args.steps = args.steps or defaults["steps"]
    args.cfg = defaults["cfg"] if args.cfg is None else args.cfg
    settings |= {"text_encoder": encoder.name, "solver": solver, "steps": args.steps, "cfg": args.cfg,
                 "seed": args.seed, "scaling_factor": scaling}  # fmt: skip
    return {"model": model, "process": process, "encoder": encoder, "autoencoder": ae.to(device).eval(),
            "scaling": scaling, "shift": shift, "solver": solver, "settings": settings, "resolution": resolution,
            "compression": ae.spatial_compression, "patch": int(model.config.get("patch_size", 1))}  # fmt: skip


def _latent_size(text: str | None, resolution: int | None, compression: int, patch: int) -> tuple[int, int]:
    """--size HxW (pixels) -> the latent size; default the model's training resolution, square."""
    if text:
        try:
            h, w = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise UserError(f"--size {text!r}: give HEIGHTxWIDTH in pixels, e.g. 512x768") from None
    else:
        h = w = int(resolution or 512)
    step = compression * patch
    if h <= 0 or w <= 0 or h % step or w % step:
        raise UserError(f"--size {h}x{w}: height and width must be positive multiples of {step} "
                        f"(the autoencoder's f{compression} times the patch size {patch})")  # fmt: skip
    return h // compression, w // compression


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
    from dcae.diffusion.sana_pipeline import export_pipeline
    from dcae.utils.io import check_input, check_output_dir

    check_input(args.ckpt, "--ckpt")
    check_output_dir(args.output, "output folder (-o)")
    folder = export_pipeline(args.ckpt, args.output, overwrite=args.overwrite, solver=args.solver, shift=args.shift,
                             use_ema=not args.no_ema)  # fmt: skip
    print(f"diffusers SANA pipeline: {folder} (diffusers.SanaPipeline.from_pretrained, or dcae t2i sample --model)")
    return 0


# ----------------------------------------------------------------------------- the parser
def register(sub: argparse._SubParsersAction) -> None:
    from dcae.diffusion.commands import cmd_train

    p = sub.add_parser("t2i", help="text-to-image on DC-AE latents: cache, train, sample (SANA-style)")
    tsub = p.add_subparsers(dest="t2i_command", metavar="WHAT")
    c = tsub.add_parser("cache", help="precompute DC-AE latents (resolution buckets) and text embeddings")
    c.add_argument("--data", nargs="+", required=True,
                   help="folders with sidecar captions, JSONL/CSV manifests, webdataset .tar")  # fmt: skip
    c.add_argument("--model", required=True, help="autoencoder: zoo name, Hub id, local folder or weight file")
    c.add_argument("--text-encoder", required=True, help="Hub id or folder (Gemma-2, T5, Qwen2, CLIP, BERT-like)")
    c.add_argument("-o", "--output", required=True, help="output folder; reruns resume")
    c.add_argument("--resolution", type=int, default=512, help="bucket base resolution (about R^2 pixels)")
    c.add_argument("--patch-size", type=int, default=1, help="the network's patch size (bucket sizes divide by f*p)")
    c.add_argument("--max-tokens", type=int, help="tokens per prompt (default 300, as SANA; CLIP: 77)")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--shard-size", type=int, default=1024)
    c.add_argument("--device", default="auto")
    c.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="autoencoder dtype")
    c.add_argument("--text-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="text encoder dtype")
    c.add_argument("--overwrite", action="store_true", help="replace a cache of another plan")
    c.set_defaults(func=cmd_cache)

    t = tsub.add_parser("train", help="train a SANA-style model on a `dcae t2i cache` folder (resumes)",
                        description="dcae t2i train CONFIG.yaml [key=value ...]: the diffusion trainer on text "
                        "latents (see configs/t2i_tiny.yaml)")  # fmt: skip
    t.__class__ = IntermixedParser
    t.add_argument("config", nargs="?", help="YAML config")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-4 max_steps=1000")
    t.add_argument("--print-config", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = tsub.add_parser("export", help="a diffusers SANA pipeline folder from a text-to-image run of ours")
    e.add_argument("--ckpt", required=True, help="run folder or checkpoint")
    e.add_argument("-o", "--output", required=True, help="the pipeline folder")
    e.add_argument("--solver", default="euler", choices=["euler", "heun", "dpm++"], help="its scheduler")
    e.add_argument("--shift", type=float, default=1.0, help="the scheduler's flow shift")
    e.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(func=cmd_export)

    s = tsub.add_parser("sample", help="images from prompts with a text-to-image model")
    s.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    s.add_argument("--prompts", help="a file with one prompt per line")
    s.add_argument("-o", "--output", required=True, help="output folder: images/, grid.png, samples.json")
    s.add_argument("--per-prompt", type=int, default=1, help="images per prompt (default 1)")
    s.add_argument("--grid", type=int, default=16, help="images in grid.png (0: none)")
    add_sampling_options(s)
    s.set_defaults(func=cmd_sample)

    from dcae.diffusion.t2i_eval import add_eval_parser

    add_eval_parser(tsub)
    p.set_defaults(func=lambda args: p.print_help() or 2)


def add_sampling_options(s: argparse.ArgumentParser) -> None:
    """The model and sampling options of `dcae t2i sample` (also those of `dcae t2i eval`)."""
    s.add_argument("--ckpt", help="our text-to-image run folder or checkpoint")
    s.add_argument("--model", help="a diffusers SANA pipeline: folder or Hub id")
    s.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the pipeline's, else 4.5)")
    s.add_argument("--steps", type=int, help="solver steps (default: the pipeline's, else 20)")
    s.add_argument("--solver", default="auto", choices=["auto", "euler", "heun", "dpm++", "ddim"])
    s.add_argument("--shift", type=float, help="flow shift of the time grid (default: the model's)")
    s.add_argument("--size", help="HEIGHTxWIDTH in pixels (default: the training resolution, square)")
    s.add_argument("--seed", type=int, default=0, help="image i's noise is seeded by (seed, i)")
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--text-encoder", help="override the text encoder the checkpoint records")
    s.add_argument("--autoencoder", help="override the autoencoder the checkpoint records")
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    s.add_argument("--overwrite", action="store_true", help="replace existing images")
