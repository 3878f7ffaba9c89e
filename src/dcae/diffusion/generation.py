"""What every sampler shares (`dcae sample`, for our own checkpoints and the released models, and `dcae t2i
sample` / `dcae t2i eval`): the condition of each image (balanced over all classes unless given, as FID
protocols sample), seeded and decoded samples written to disk under the folder's plan, and the gFID of the
result.

The plan (`plan.json`, written atomically before the first image is): what each image index will be, i.e. the
settings that fix every image (the model: checkpoint path and step, or pipeline / released model; solver,
steps, guidance, seed, size, dtype, ...) and each image's condition value (prompt or class). A rerun with
the same plan makes only the missing images; one whose earlier images are the same and that plans more
images makes the new ones; any other plan is refused in one line naming the folder and what differs, unless
--overwrite, which removes every image (and what was derived from them) and makes them all again."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dcae.data.images import save_image
from dcae.diffusion.cache import decode_scaled
from dcae.diffusion.conditioning import Conditioning
from dcae.errors import NonFiniteError, UserError
from dcae.metrics.accumulate import dataset_stats
from dcae.metrics.data import collect_images
from dcae.metrics.fid import GaussianStats, InceptionFeatures, fid_from_stats
from dcae.utils.io import atomic_write_json

PLAN_NAME, PLAN_FORMAT = "plan.json", "dcae-samples-plan/1"
# What `dcae sample` derives from a folder's images (removed with them by --overwrite).
SAMPLE_REPORTS = ("grid.png", "samples.json", "fid.json")
_IMAGE_NAME = re.compile(r"^\d{6}\.png$")


def condition_values(conditioning: Conditioning, text: str | None, n: int, meta: dict) -> list:
    """The condition of each of n images (`--classes`, or all classes evenly, as FID protocols sample)."""
    if n < 1:
        raise UserError("-n must be >= 1")
    return conditioning.values(text, n, meta)


def leading_channels(shape: tuple, model, channels: int | None, autoencoder, source: str) -> tuple[int, ...]:
    """The latent shape to generate: all channels, or with --channels a leading subset, which a model trained
    with DC-AE 1.5's augmented training (adaptive channels) generates and a structured decoder decodes (its
    first conv's first input channels: as if the others were zero)."""
    if not channels or channels == shape[0]:
        return tuple(shape)
    full = shape[0]
    if not getattr(model, "adaptive_channel", False):
        raise UserError(f"--channels {channels}: {source} was not trained with augmented training "
                        f"(augmented.channels); it generates all {full} channels")  # fmt: skip
    if not 1 <= channels <= full:
        raise UserError(f"--channels {channels}: {source} generates 1..{full} latent channels")
    if not autoencoder.config.decoder_sliceable_in:
        raise UserError(f"--channels {channels}: the autoencoder {autoencoder.config.name} decodes only all {full} "
                        "channels (a structured, DC-AE 1.5 decoder decodes leading subsets)")  # fmt: skip
    return (channels, *shape[1:])


class ImageSampler:
    """Decoded samples for given image indices. Image i's noise comes from a generator seeded by
    seed * 1_000_003 + i (`seed_of(seed, i)` where given: a diffusers pipeline's images are seeded seed + i), so
    the batch size, the number of processes and reruns that fill in missing images do not change image i.
    `latents(noise, values, seeds, generators)` generates the batch's (scaled) latents; `finish(images)`, where
    given, changes the decoded images (e.g. SanaPipeline's resize and crop back from its resolution bin)."""

    def __init__(self, latents, autoencoder, scaling_factor: float, shape: tuple, seed: int, device, dtype: str,
                 seed_of=None, finish=None):  # fmt: skip
        self.latents, self.ae, self.scaling, self.shape = latents, autoencoder, scaling_factor, shape
        self.seed, self.device, self.dtype = seed, device, dtype
        self.seed_of = seed_of or (lambda seed, i: seed * 1_000_003 + i)
        self.finish = finish

    def images(self, idx: list[int], values: list) -> torch.Tensor:
        seeds = [self.seed_of(self.seed, i) for i in idx]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(self.device)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.dtype == "bf16")
        with torch.no_grad(), autocast:
            z = self.latents(noise, [values[i] for i in idx], seeds, gens)
        if not torch.isfinite(z).all():
            raise NonFiniteError("sampling produced NaN/Inf latents")
        with torch.no_grad():
            images = decode_scaled(self.ae, z, self.scaling)
        return self.finish(images) if self.finish is not None else images


def compute_gfid(images, reference: str, device, resolution: int | None = None, batch_size: int = 32) -> float:
    """gFID of generated images (a folder or a list of files) against reference statistics (.npz with mu,
    sigma, as pytorch-fid writes) or a reference image folder (ADM center crop to `resolution`), with
    dcae.metrics' TF-Inception protocol."""

    inception = InceptionFeatures().to(device).eval()
    if str(reference).endswith(".npz"):
        ref = GaussianStats.load(reference)
    else:
        ref, _ = dataset_stats(collect_images(reference), inception, resolution, batch_size, progress=True, desc="ref")
    gen, skipped = dataset_stats(collect_images(images), inception, None, batch_size, progress=True, desc="gFID")
    if skipped:
        raise UserError(f"{len(skipped)} generated image(s) could not be read, e.g. {skipped[0]}")
    return float(fid_from_stats(gen, ref))


def write_samples(
    images,
    values: list,
    out,
    n: int,
    batch_size: int,
    overwrite: bool,
    rank: int,
    world: int,
    desc: str = "sampling",
    *,
    settings: dict,
    condition: str = "class",
    stale: tuple[str, ...] = (),
) -> list:
    """Generate and write images out/images/000000.png ... for indices 0..n-1; `images(indices, values)`
    yields one image tensor per index. First the folder's plan (`settings`, and `values` named `condition`)
    is checked by the first process while the others wait (`check_plan`; a refusal stops every process), and
    each process records it (`record_plan`) before it writes its first image, once that image is made (so
    that input found bad by the first batch leaves nothing behind). Image i belongs to process i % world
    (fixed by the index, not by what exists when a process looks: the others may already be writing); reruns
    of the same plan make only the missing ones. Returns every path, after all processes have written
    theirs."""  # fmt: skip
    out = Path(out)
    plan, refusal = sample_plan(settings, condition, values[:n]), None
    if rank == 0:
        try:
            check_plan(out, plan, overwrite, stale)
        except UserError as exc:
            refusal = str(exc)
    if world > 1:
        box = [refusal]
        torch.distributed.broadcast_object_list(box, src=0)  # also the barrier: the folder has been checked
        refusal = box[0]
    if refusal is not None:
        raise UserError(refusal)
    paths = [out / "images" / f"{i:06d}.png" for i in range(n)]
    todo = [i for i in range(n) if i % world == rank and not paths[i].exists()]
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=n < 2 or rank != 0)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        made = images(idx, values)
        if start == 0:
            record_plan(out, plan)  # no image without its plan
        for i, img in zip(idx, made):
            save_image(img, paths[i])
        bar.update(len(idx))
    bar.close()
    if world > 1:
        torch.distributed.barrier()  # every image is written before the first process reads them
    return paths


# ----------------------------------------------------------------------------- the folder's plan
def sample_plan(settings: dict, condition: str, values: list) -> dict:
    """The plan of a sample folder: the `settings` that fix every image and each image's condition value
    (`condition` names its kind: "prompt", "class"), as JSON stores it."""
    plan = {"format": PLAN_FORMAT, "settings": settings, "condition": condition, "values": list(values)}
    return json.loads(json.dumps(plan, default=str))


def record_plan(out: Path, plan: dict) -> None:
    """out/plan.json, atomically (several processes may write the same plan at once)."""
    atomic_write_json(Path(out) / PLAN_NAME, plan)


def check_plan(out: Path, plan: dict, overwrite: bool, stale: tuple[str, ...] = ()) -> None:
    """Whether `out` may take the images of `plan` (recorded by `record_plan` before the first of them):
    - no image there, the same plan, or the same settings with the recorded values as the first of the new
      ones: yes (the missing images are made);
    - another plan, images but no plan, or an unreadable plan: a one-line UserError naming the folder and
      what differs, unless `overwrite`, which removes every image of out/images and the files derived from
      them (`stale`, names in `out`; *.png of a folder) now."""
    out = Path(out)
    file = out / PLAN_NAME
    images = sorted(p for p in (out / "images").glob("*.png") if _IMAGE_NAME.match(p.name))
    if overwrite:
        for p in images:
            p.unlink()
        for name in stale:
            target = out / name
            if target.is_dir():
                for f in target.glob("*.png"):
                    f.unlink()
            elif target.exists():
                target.unlink()
    else:
        why = _differs(file, plan, len(images))
        if why:
            raise UserError(f"{out} holds images of another plan ({why}); use another output folder (-o) or "
                            "--overwrite")  # fmt: skip


def _differs(file: Path, plan: dict, images: int) -> str | None:
    """Why the plan recorded in `file` (next to `images` numbered images) does not allow `plan`, or None."""
    if not images:
        return None  # nothing there to mix with
    if not file.exists():
        return f"{images} image(s) and no {PLAN_NAME}"
    try:
        old = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{file} cannot be read: {type(exc).__name__}"
    if not isinstance(old, dict) or old.get("format") != PLAN_FORMAT:
        return f"{file} was written by an earlier version"
    settings, new = old.get("settings") or {}, plan["settings"]
    changed = [k for k in sorted({*settings, *new}) if settings.get(k) != new.get(k)]
    if changed:
        shown = ", ".join(f"{k} {_shown(settings.get(k))} -> {_shown(new.get(k))}" for k in changed[:4])
        return shown + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")
    before, now, what = old.get("values") or [], plan["values"], plan["condition"]
    other = [i for i, (a, b) in enumerate(zip(before, now)) if a != b]
    if other:
        i = other[0]
        return (f"{len(other)} image(s) of another {what}, first image {i}: {_shown(before[i])} -> "
                f"{_shown(now[i])}")  # fmt: skip
    if len(now) < len(before):
        return f"{len(before)} images planned there, {len(now)} now"
    return None


def _shown(value, most: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= most else text[: most - 3] + "..."
