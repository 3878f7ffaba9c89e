"""Sampling a released diffusers SANA pipeline as `SanaPipeline.__call__` does, with our transformer.

What `dcae t2i sample` does for every solver with a diffusers scheduler (a released pipeline's own, a
dcae-exported pipeline's, or for --ckpt the one `dcae t2i export` would write; binning and the instruction
for released pipelines only), mirroring diffusers' `pipelines/sana/pipeline_sana.py`:

- the scheduler is the pipeline's own diffusers class, made from its scheduler_config.json (a fresh one per
  batch: multistep schedulers keep state), driven as SanaPipeline drives it: `set_timesteps(steps)`, then for
  each of its `timesteps` t the transformer at timestep t (diffusers' scale, 0..1000; our transformer applies
  `timestep_scale` itself, where the pipeline multiplies it in), guidance `uncond + g * (text - uncond)` when
  g > 1 (no unconditional half otherwise), the prediction in fp32 and `scheduler.step(pred, t, latents)`;
- resolution binning: the size asked for is generated at the nearest bin (by aspect ratio) of the table the
  transformer's `sample_size` selects (16: 512 px, 32: 1024, 64: 2048, 128: 4096; diffusers'
  ASPECT_RATIO_*_BIN), and the decoded image is resized (bilinear) and center-cropped back to it with
  `resize_and_crop_tensor`, as the pipeline does;
- the initial noise is float32 `randn` of shape (1, C, H/f, W/f) from a CPU generator seeded S for image 0, as
  `randn_tensor` draws it; image i of a run is seeded S + i, so each image equals SanaPipeline's single image
  with `generator=torch.Generator("cpu").manual_seed(S + i)`, whatever the batch size.

The prompt side (300 Gemma tokens, the complex human instruction, the empty negative prompt) is the pipeline's
TextEncoder (`load_pipeline`). Schedulers: FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler and
DPMSolverMultistepScheduler on flow sigmas (SANA 1.0 / 1.5). Dynamic shifting needs a `mu` that SanaPipeline never
passes (diffusers fails too) and stochastic variants need the pipeline's generator: each is one line."""

from __future__ import annotations

from pathlib import Path

import torch

from dcae.diffusion.conditioning import Text
from dcae.diffusion.solvers import SCHEDULERS
from dcae.errors import UserError

BIN_TABLES = {128: "ASPECT_RATIO_4096_BIN", 64: "ASPECT_RATIO_2048_BIN", 32: "ASPECT_RATIO_1024_BIN",
              16: "ASPECT_RATIO_512_BIN"}  # fmt: skip  # SanaPipeline.__call__: transformer sample_size -> table


def binned_size(sample_size: int, height: int, width: int, sprint: bool = False) -> tuple[int, int]:
    """The size SanaPipeline generates a height x width image at: the nearest bin of sample_size's table
    (SanaSprintPipeline: only sample_size 32, the 1024 px table)."""
    from diffusers.image_processor import PixArtImageProcessor
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as tables

    known = {32: BIN_TABLES[32]} if sprint else BIN_TABLES
    name = known.get(int(sample_size))
    if name is None:
        raise UserError(f"resolution binning has no table for a transformer of sample_size {sample_size} (SANA's: "
                        f"{', '.join(map(str, sorted(known)))}); pass --no-resolution-binning")  # fmt: skip
    return PixArtImageProcessor.classify_height_width_bin(height, width, ratios=getattr(tables, name))


def resize_and_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Decoded images (B, 3, h, w) resized and center-cropped to height x width as SanaPipeline does."""
    from diffusers.image_processor import PixArtImageProcessor

    return PixArtImageProcessor.resize_and_crop_tensor(images, width, height)


def make_scheduler(config: dict, path: Path | str, shift: float | None = None):
    """A fresh diffusers scheduler from a pipeline's scheduler config (`shift`: its flow shift replaced)."""
    import diffusers

    name = config.get("_class_name")
    if name == "SCMScheduler":  # SANA-Sprint's: TrigFlow, no flow shift
        if shift is not None:
            raise UserError(f"{path}: SCMScheduler has no flow shift (--shift)")
        return diffusers.SCMScheduler.from_config(config)
    if name not in SCHEDULERS:
        raise UserError(f"{path}: scheduler {name!r} is not one dcae samples with ({', '.join(SCHEDULERS)})")
    if config.get("stochastic_sampling") or str(config.get("algorithm_type", "")).startswith("sde"):
        raise UserError(f"{path}: a stochastic scheduler ({name}) is not supported")
    config = dict(config)
    if shift is not None:
        config[SCHEDULERS[name][1]] = float(shift)
    return getattr(diffusers, name).from_config(config)


@torch.no_grad()
def sample_as_pipeline(transformer, scheduler, noise: torch.Tensor, text: Text, steps: int,
                       guidance_scale: float) -> torch.Tensor:  # fmt: skip
    """SanaPipeline.__call__'s denoising loop: `noise` (B, C, h, w) float32, `text` the prompts with the empty
    prompt as null -> the final latents (float32, scaled as the vae's scaling_factor expects)."""
    device = noise.device
    dtype = next(transformer.parameters()).dtype
    scheduler.set_timesteps(steps, device=device)
    cfg = guidance_scale > 1.0
    cond = _on(text.null().cat(text) if cfg else text, device, dtype)  # [uncond; cond], as the pipeline batches
    latents = noise.float()
    channels = latents.shape[1]
    for t in scheduler.timesteps:
        x = torch.cat([latents] * 2) if cfg else latents
        pred = transformer(x.to(dtype), t.expand(x.shape[0]), cond).float()
        if cfg:
            uncond, cond_pred = pred.chunk(2)
            pred = uncond + guidance_scale * (cond_pred - uncond)
        if pred.shape[1] // 2 == channels:  # learned sigma
            pred = pred.chunk(2, dim=1)[0]
        latents = scheduler.step(pred, t, latents, return_dict=False)[0]
    return latents


def _on(text: Text, device, dtype: torch.dtype) -> Text:
    """The prompts on `device`, their embeddings in the transformer's dtype (as the pipeline passes them)."""
    return Text(text.emb.to(device, dtype), text.mask.to(device), text.null_emb.to(device), text.null_mask.to(device))


SPRINT_MAX_TIMESTEP, SPRINT_INTERMEDIATE_TIMESTEP = 1.57080, 1.3  # SanaSprintPipeline.__call__'s defaults


@torch.no_grad()
def sample_as_sprint(transformer, scheduler_of, noise: torch.Tensor, text: Text, steps: int, guidance_scale: float,
                     generators: list[torch.Generator]) -> torch.Tensor:  # fmt: skip
    """SanaSprintPipeline.__call__'s loop (SCMScheduler, TrigFlow), one image at a time: image i's generator
    (after its noise) draws the scheduler's noise between steps, as the pipeline's one generator does for a
    single image. The intermediate timestep 1.3 is used at 2 steps (diffusers refuses it at other counts: there
    the pipeline is called with intermediate_timesteps=None). `scheduler_of()` makes a fresh SCMScheduler."""
    out = []
    saved = transformer.timestep_scale
    transformer.timestep_scale = 1.0  # the pipeline passes the TrigFlow time as it is
    try:
        for i in range(len(noise)):
            emb, mask = text.emb[i : i + 1], text.mask[i : i + 1]
            out.append(_sprint_one(transformer, scheduler_of(), noise[i : i + 1], Text(emb, mask, text.null_emb,
                                   text.null_mask), steps, guidance_scale, generators[i]))  # fmt: skip
    finally:
        transformer.timestep_scale = saved
    return torch.cat(out)


def _sprint_one(transformer, scheduler, noise, text: Text, steps: int, guidance_scale: float, generator):
    device = noise.device
    dtype = next(transformer.parameters()).dtype
    intermediate = SPRINT_INTERMEDIATE_TIMESTEP if steps == 2 else None
    scheduler.set_timesteps(steps, device=device, max_timesteps=SPRINT_MAX_TIMESTEP,
                            intermediate_timesteps=intermediate)  # fmt: skip
    scheduler.set_begin_index(0)
    sigma_data = scheduler.config.sigma_data
    latents = noise.float() * sigma_data
    guidance = torch.full([1], guidance_scale, device=device, dtype=torch.float32)
    guidance = guidance.expand(latents.shape[0]).to(text.emb.dtype) * transformer.config["guidance_embeds_scale"]
    cond = _on(text, device, dtype)
    denoised = latents
    for t in scheduler.timesteps[:-1]:
        timestep = t.expand(latents.shape[0])
        x = latents / sigma_data
        scm = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
        s = scm.view(-1, 1, 1, 1)
        x = x * torch.sqrt(s**2 + (1 - s) ** 2)
        pred = transformer(x.to(dtype), scm, cond, guidance=guidance)
        pred = ((1 - 2 * s) * x + (1 - 2 * s + 2 * s**2) * pred) / torch.sqrt(s**2 + (1 - s) ** 2)
        pred = pred.float() * sigma_data
        latents, denoised = scheduler.step(pred, timestep, latents, generator=generator, return_dict=False)
    return denoised / sigma_data
