"""What `dcae t2i sample` and `dcae t2i eval` share: choosing the model (one of ours or a SANA pipeline),
loading it with its text encoder and autoencoder, and generating images seeded per image (resumable, split
across processes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dcae.errors import UserError
from dcae.utils import numbers
from dcae.utils.cliargs import (
    add_batch_size,
    add_device,
    add_dtype,
    add_overwrite,
    add_seed,
    add_solver,
    flow_shift,
    guidance_scale,
    image_size,
    number_type,
    positive_int,
    size_of,
)
from dcae.utils.sizes import check_images_fit


def check_model_source(args: argparse.Namespace) -> None:
    """Exactly one of --ckpt / --model, and it is not a link to nothing."""
    from dcae.utils.io import check_input

    if bool(args.ckpt) == bool(args.model):
        raise UserError("pass --ckpt (a text-to-image run or checkpoint of ours) or --model (a SANA pipeline)")
    check_input(args.ckpt or args.model, "--ckpt" if args.ckpt else "--model", must_exist=bool(args.ckpt))


def generate_images(
    args: argparse.Namespace, values: list[str], out: Path, stale: tuple[str, ...] = ()
) -> tuple[list[Path], dict, int]:
    """Image i of prompt values[i] -> out/images/%06d.png under the folder's plan (dcae.diffusion.generation:
    the same plan makes the missing ones only, another is refused unless --overwrite, which also removes the
    files `stale` derived from the images), split across processes. Returns every path, the settings and
    this process's rank."""
    from dcae.diffusion.generation import write_samples
    from dcae.utils.devices import process_group_from_env

    rank, world, device = process_group_from_env(args.device)
    run, settings, plan = build_sampler(args, device)
    paths = write_samples(run.images, values, out, len(values), args.batch_size, args.overwrite, rank, world,
                          settings=plan, condition="prompt", stale=stale)  # fmt: skip
    return paths, settings, rank


def build_sampler(args: argparse.Namespace, device):
    """The model of --ckpt / --model loaded and its sampler: (ImageSampler, settings, the folder's plan).
    Every solver with a diffusers scheduler (euler, heun, dpm++; a pipeline's own scheduler with --solver auto)
    samples as SanaPipeline.__call__ does (dcae.diffusion.t2i.sana_call), image i seeded seed + i; others
    (ddim) with our sampler, image i seeded seed * 1_000_003 + i."""
    m = _load_for_sampling(args, device)
    if m["scheduler"] is not None:
        return _pipeline_sampler(args, m, device)
    import torch

    from dcae.diffusion.generation import ImageSampler
    from dcae.diffusion.processes.sampling import sample

    size = _latent_size(args.size, m["resolution"], m["compression"], m["patch"])
    shape = _channels((m["model"].in_channels, *size), m, args)

    shift = args.shift if args.shift is not None else m["shift"]

    def latents(noise, batch_prompts: list[str], seeds: list[int], generators):
        cond = m["encoder"].encode(batch_prompts).float().to(device)
        return sample(m["model"], m["process"], noise, cond, steps=args.steps, solver=m["solver"],
                      cfg_scale=args.cfg, shift=shift,
                      generator=torch.Generator(device).manual_seed(seeds[0]))  # fmt: skip

    settings = {**m["settings"], "shift": shift, "latent_shape": list(shape)}
    plan = _plan(settings, m, args)
    run = ImageSampler(latents, m["autoencoder"], m["scaling"], shape, args.seed, device, args.dtype)
    return run, settings, plan


def _pipeline_sampler(args, m: dict, device):
    """SanaPipeline.__call__'s sampling (dcae.diffusion.t2i.sana_call) with the scheduler m["scheduler"] (a
    released pipeline's own, a dcae-exported pipeline's, or the one `dcae t2i export` writes for a checkpoint's
    solver and shift): resolution binning where m["binning"], image i seeded seed + i."""
    from dcae.diffusion.generation import ImageSampler
    from dcae.diffusion.t2i.sana_call import (
        binned_size,
        make_scheduler,
        resize_and_crop,
        sample_as_pipeline,
        sample_as_sprint,
    )

    config, where, sprint = m["scheduler"], m["scheduler_path"], m["sprint"]
    binning = m["binning"] and not args.no_resolution_binning
    if args.size:
        height, width = size_of(args.size)
    else:
        height = width = int(m["resolution"])
    if binning:
        gen_h, gen_w = binned_size(m["model"].sample_size, height, width, sprint=sprint)
    else:
        gen_h, gen_w = height, width
        _latent_size(f"{height}x{width}", None, m["compression"], m["patch"])
    f = m["compression"]
    shape = _channels((m["model"].in_channels, gen_h // f, gen_w // f), m, args)
    make_scheduler(config, where, args.shift)  # an unsupported one: one line, before any work

    def latents(noise, batch_prompts: list[str], seeds: list[int], generators):
        text = m["encoder"].encode(batch_prompts)
        if sprint:
            return sample_as_sprint(m["model"], lambda: make_scheduler(config, where), noise, text, args.steps,
                                    args.cfg, generators)  # fmt: skip
        return sample_as_pipeline(m["model"], make_scheduler(config, where, args.shift), noise, text, args.steps,
                                  args.cfg)  # fmt: skip

    def finish(images):
        return resize_and_crop(images, height, width) if (gen_h, gen_w) != (height, width) else images

    shift = args.shift if args.shift is not None else m["shift"]
    settings = {**m["settings"], "scheduler": config.get("_class_name"), "shift": shift,
                "resolution_binning": binning, "instruction": m["instruction"], "size": [height, width],
                "latent_shape": list(shape)}  # fmt: skip
    if m["released"]:
        settings["solver"] = config.get("_class_name")
    plan = _plan(settings, m, args)
    run = ImageSampler(latents, m["autoencoder"], m["scaling"], shape, args.seed, device, args.dtype,
                       seed_of=lambda seed, i: seed + i, finish=finish)  # fmt: skip
    return run, settings, plan


def _plan(settings: dict, m: dict, args: argparse.Namespace) -> dict:
    """The sample folder's plan: the settings with every model source recorded as a path from anywhere
    (dcae.diffusion.cache.recorded_source), the autoencoder's and the dtype."""
    from dcae.diffusion.cache import recorded_source

    plan = {**settings, "autoencoder": recorded_source(m["autoencoder_source"]), "dtype": args.dtype}
    for key in ("checkpoint", "model", "lora"):
        if key in plan:
            plan[key] = recorded_source(plan[key])
    return plan


def _channels(shape: tuple, m: dict, args: argparse.Namespace) -> tuple:
    """--channels N: the first N latent channels of a model trained with augmented training (DC-AE 1.5)."""
    from dcae.diffusion.generation import leading_channels

    source = getattr(args, "ckpt", None) or getattr(args, "model", None) or "the model"
    return leading_channels(shape, m["model"], getattr(args, "channels", None), m["autoencoder"], str(source))


def _load_for_sampling(args, device) -> dict:
    """Network, process, text encoder, autoencoder, the diffusers scheduler config to sample with (None: our
    sampler) and settings from one of our checkpoints or a pipeline."""
    from dcae.diffusion.cache import load_autoencoder
    from dcae.diffusion.processes.flow import FlowMatching
    from dcae.diffusion.solvers import EXPORT_SOLVERS
    from dcae.diffusion.t2i.encoders import TextEncoder
    from dcae.diffusion.t2i.pipeline import _scheduler_config
    from dcae.diffusion.train.checkpoint import conditioning_of, load_checkpoint

    released, sprint, instruction, scheduler, where = False, False, False, None, None
    if args.model:
        from dcae.diffusion.t2i.pipeline import load_pipeline

        p = load_pipeline(args.model, device=device, instruction=False if args.no_instruction else None)

        model, encoder, ae, scaling = p.transformer.to(device).eval(), p.text_encoder, p.autoencoder, p.scaling_factor
        settings, ae_source = {"model": str(args.model)}, None  # the pipeline's own vae
        process, shift, resolution = FlowMatching(), p.shift, p.resolution
        defaults = {"solver": p.solver, "steps": p.steps, "cfg": p.guidance_scale}
        released, sprint, instruction = not p.exported, p.sprint, p.instruction
        if p.sprint and args.solver != "auto":
            raise UserError(f"{args.model}: a SanaSprintPipeline samples with its SCMScheduler only (--solver auto)")
        if args.solver in ("auto", p.solver):  # the pipeline's own scheduler
            scheduler, where = p.scheduler_config, p.scheduler_path
    else:
        model, process, meta = load_checkpoint(args.ckpt, use_ema=not args.no_ema, device=device)
        conditioning, lat = conditioning_of(meta), meta["latents"]
        if conditioning.kind != "text":
            raise UserError(f"{meta['path']} is not a text-to-image model; sample it with `dcae sample`")
        source = args.text_encoder or lat.text_encoder
        encoder = TextEncoder.from_pretrained(source, device=device, max_tokens=conditioning.max_tokens)
        if encoder.width != conditioning.caption_channels:
            raise UserError(f"text encoder {source} gives {encoder.width}-wide tokens; the model takes "
                            f"{conditioning.caption_channels} ({lat.text_encoder})")  # fmt: skip
        ae = load_autoencoder(lat, args.autoencoder)
        ae_source = args.autoencoder or lat.autoencoder
        scaling, shift, resolution = lat.scaling_factor, 1.0, lat.resolution
        if args.autoencoder and abs(ae.scaling_factor - scaling) > 1e-6 * scaling:
            raise UserError(f"--autoencoder {args.autoencoder} has scaling factor {ae.scaling_factor:g}; the model "
                            f"was trained on latents scaled by {scaling:g} ({lat.autoencoder})")  # fmt: skip
        settings = {"checkpoint": meta["path"], "step": meta["step"], "ema": not args.no_ema}
        defaults = {"solver": "euler", "steps": 20, "cfg": 4.5}
    if getattr(args, "lora", None):  # a diffusers-format LoRA on top (dcae.diffusion.t2i.lora_io)
        from dcae.diffusion.t2i.lora_io import load_lora

        model = load_lora(model, args.lora, args.lora_scale)
        settings |= {"lora": args.lora, "lora_scale": args.lora_scale}
    if ae.latent_channels != model.in_channels:
        raise UserError(f"the autoencoder has {ae.latent_channels} latent channels, the model {model.in_channels}")
    solver = args.solver if args.solver != "auto" else defaults["solver"]
    if scheduler is None and solver in EXPORT_SOLVERS and isinstance(process, FlowMatching):
        scheduler = _scheduler_config(solver, shift)  # what `dcae t2i export` writes for this solver and shift
        where = f"the {solver} scheduler"
    args.steps = args.steps or defaults["steps"]
    args.cfg = defaults["cfg"] if args.cfg is None else args.cfg
    settings |= {"text_encoder": encoder.name, "solver": solver, "steps": args.steps, "cfg": args.cfg,
                 "seed": args.seed, "scaling_factor": scaling}  # fmt: skip
    return {"model": model, "process": process, "encoder": encoder, "autoencoder": ae.to(device).eval(),
            "scaling": scaling, "shift": shift, "solver": solver, "settings": settings, "resolution": resolution,
            "compression": ae.spatial_compression, "patch": int(model.config.get("patch_size", 1)),
            "autoencoder_source": ae_source, "scheduler": scheduler, "scheduler_path": where, "sprint": sprint,
            "released": released, "binning": released, "instruction": instruction}  # fmt: skip


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


def check_size_fits(args: argparse.Namespace, images: int | None = None) -> None:
    """--size with --batch-size (at most `images`, the number asked for, when known) fits in memory, or one line
    before any work (dcae.utils.sizes). Without --size the model's training resolution is used: not checked."""
    if not args.size:
        return
    h, w = size_of(args.size)
    batch = min(args.batch_size, images or args.batch_size)
    check_images_fit(h, w, batch, args.device, f"--size {args.size}")


def add_sampling_options(s: argparse.ArgumentParser) -> None:
    """The model and sampling options of `dcae t2i sample` (also those of `dcae t2i eval`)."""
    from dcae.diffusion.solvers import FLOW_MODEL_SOLVERS

    s.add_argument("--ckpt", help="our text-to-image run folder or checkpoint")
    s.add_argument("--model", help="a diffusers SANA pipeline: folder or Hub id")
    s.add_argument(
        "--cfg",
        type=guidance_scale,
        help="classifier-free guidance scale 0..100, 1: off (default: the pipeline's, else 4.5)",
    )
    s.add_argument("--steps", type=positive_int, help="solver steps (default: the pipeline's, else 20)")
    add_solver(s, FLOW_MODEL_SOLVERS, what="auto: the pipeline's, else euler")
    s.add_argument("--shift", type=flow_shift, help="flow shift of the time grid, > 0 (default: the model's)")
    s.add_argument("--size", type=image_size,
                   help="HEIGHTxWIDTH in pixels (default: the training resolution, square)")  # fmt: skip
    s.add_argument("--channels", type=positive_int,
                   help="a model trained with augmented.channels (DC-AE 1.5): generate the first N latent channels "
                   "only; the structured decoder decodes them")  # fmt: skip
    add_seed(s, "image i: as diffusers with generator seed + i (--solver ddim: seed * 1000003 + i)")
    s.add_argument(
        "--no-resolution-binning",
        action="store_true",
        help="a released pipeline: generate at --size itself, not at the nearest of SANA's bins",
    )
    s.add_argument("--no-instruction", action="store_true",
                   help="a Gemma pipeline: no complex human instruction before the prompts")  # fmt: skip
    add_batch_size(s, 4, "images per batch")
    s.add_argument("--lora", help="a diffusers-format SANA LoRA (pytorch_lora_weights.safetensors or its folder)")
    s.add_argument(
        "--lora-scale",
        type=number_type(numbers.FINITE, "lora_scale", "scales"),
        default=1.0,
        help="the LoRA update's scale (default 1; 0: the base model)",
    )
    s.add_argument("--text-encoder", help="override the text encoder the checkpoint records")
    s.add_argument("--autoencoder", help="override the autoencoder the checkpoint records")
    s.add_argument("--no-ema", action="store_true", help="the raw weights instead of the EMA")
    add_device(s)
    add_dtype(s, "diffusion model compute", fp16=False)
    add_overwrite(s, "replace existing images")


def generate(source, prompts, *, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
             height: int | None = None, width: int | None = None, solver: str = "auto", shift: float | None = None,
             batch_size: int = 4, device: str = "auto", dtype: str = "fp32", resolution_binning: bool = True,
             instruction: bool = True, use_ema: bool = True, text_encoder: str | None = None,
             autoencoder: str | None = None) -> list:  # fmt: skip
    """Images (PIL, RGB) of `prompts` (one string or a list: image i of prompts[i]) from `source`: a diffusers
    SANA pipeline folder or Hub id (`dcae t2i sample --model`), or one of our text-to-image runs or checkpoints
    (`--ckpt`; a folder without model_index.json). The same code as `dcae t2i sample` (`build_sampler`): image i
    equals that command's images/%06d.png i for the same seed and settings. None: the model's default (steps,
    guidance, the training resolution); height alone: a square. `resolution_binning` / `instruction` False: as
    --no-resolution-binning / --no-instruction (they apply to released pipelines only)."""
    from PIL import Image

    from dcae.data.images import tensor_to_uint8
    from dcae.utils.devices import resolve_device

    prompts = [prompts] if isinstance(prompts, str) else [str(p) for p in prompts]
    path = Path(str(source)).expanduser()
    pipeline = not path.exists() or (path.is_dir() and (path / "model_index.json").is_file())
    parser = argparse.ArgumentParser(prog="dcae.diffusion.t2i.generate")
    add_sampling_options(parser)
    args = parser.parse_args([])
    if height is not None or width is not None:
        h = height if height is not None else width
        args.size = f"{h}x{width if width is not None else h}"
    args.model, args.ckpt = (str(source), None) if pipeline else (None, str(source))
    args.seed, args.steps, args.cfg, args.solver, args.shift = int(seed), steps, guidance_scale, solver, shift
    args.batch_size, args.device, args.dtype = int(batch_size), device, dtype
    args.no_resolution_binning, args.no_instruction, args.no_ema = not resolution_binning, not instruction, not use_ema
    args.text_encoder, args.autoencoder = text_encoder, autoencoder
    run, _, _ = build_sampler(args, resolve_device(device))
    out = []
    for start in range(0, len(prompts), args.batch_size):
        idx = list(range(start, min(start + args.batch_size, len(prompts))))
        out += [Image.fromarray(tensor_to_uint8(img)) for img in run.images(idx, prompts)]
    return out
