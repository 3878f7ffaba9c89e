"""What `dcae sample` shares between our own diffusion checkpoints and the released models: the class of
each image (balanced over all classes unless given, as FID protocols sample) and the gFID of the result."""

from __future__ import annotations


def parse_classes(text: str | None, meta: dict, num_classes: int) -> list[int] | None:
    """'1,2,3' or class names / WordNet ids from the latent index ('tench,goldfish')."""
    from dcae.errors import UserError

    if not text:
        return None
    if num_classes == 0:
        raise UserError("this model is unconditional: drop --classes")
    names = meta.get("class_names") or []
    ids = meta.get("class_ids") or []
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item.lstrip("-").isdigit():
            k = int(item)
        elif item in ids:
            k = ids.index(item)
        elif item in names:
            k = names.index(item)
        else:
            by_name = " or names from the latent index" if names or ids else ""
            raise UserError(f"unknown class {item!r}: use indices 0..{num_classes - 1}{by_name}")
        if not 0 <= k < num_classes:
            raise UserError(f"class {k} is out of range: the model has {num_classes} classes (0..{num_classes - 1})")
        out.append(k)
    return out


def sample_labels(classes_text: str | None, n: int, lat: dict, num_classes: int) -> list:
    """The class of every image: the given classes in turn, else all classes evenly (what FID protocols use)."""
    from dcae.errors import UserError

    classes = parse_classes(classes_text, lat, num_classes)
    if n < 1:
        raise UserError("-n must be >= 1")
    if num_classes == 0:
        return [None] * n
    return [classes[i % len(classes)] if classes else i % num_classes for i in range(n)]


def compute_gfid(images, reference: str, device, resolution: int | None = None, batch_size: int = 32) -> float:
    """gFID of generated images (a folder or a list of files) against reference statistics (.npz with mu,
    sigma, as pytorch-fid writes) or a reference image folder (ADM center crop to `resolution`), with
    dcae.metrics' TF-Inception protocol."""
    from dcae.metrics.accumulate import dataset_stats
    from dcae.metrics.data import collect_images
    from dcae.metrics.fid import GaussianStats, InceptionFeatures, fid_from_stats

    inception = InceptionFeatures().to(device).eval()
    if str(reference).endswith(".npz"):
        ref = GaussianStats.load(reference)
    else:
        ref, _ = dataset_stats(collect_images(reference), inception, resolution, batch_size, progress=True, desc="ref")
    gen, skipped = dataset_stats(collect_images(images), inception, None, batch_size, progress=True, desc="gFID")
    if skipped:
        from dcae.errors import UserError

        raise UserError(f"{len(skipped)} generated image(s) could not be read, e.g. {skipped[0]}")
    return float(fid_from_stats(gen, ref))


def write_samples(
    images, labels: list, out, n: int, batch_size: int, overwrite: bool, rank: int, world: int, desc: str = "sampling"
) -> list:
    """Generate and write images out/images/000000.png ... for indices 0..n-1; `images(indices, labels)`
    yields one image tensor per index. Image i belongs to process i % world (fixed by the index, not by
    what exists when a process looks: the others may already be writing); reruns make only the missing
    ones. Returns every path, after all processes have written theirs."""  # fmt: skip
    from pathlib import Path

    import torch
    from tqdm.auto import tqdm

    from dcae.data.images import save_image

    paths = [Path(out) / "images" / f"{i:06d}.png" for i in range(n)]
    todo = [i for i in range(n) if i % world == rank and (overwrite or not paths[i].exists())]
    bar = tqdm(total=len(todo), unit="img", desc=desc, disable=n < 2 or rank != 0)
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        for i, img in zip(idx, images(idx, labels)):
            save_image(img, paths[i])
        bar.update(len(idx))
    bar.close()
    if world > 1:
        torch.distributed.barrier()  # every image is written before the first process reads them
    return paths
