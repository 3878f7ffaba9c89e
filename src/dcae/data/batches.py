"""Per-image robustness for commands that run a model over image files (`dcae encode`, `reconstruct`).

Files are planned from their headers (cheap, nothing decoded), grouped by size so that batches stack,
and decoded one batch at a time, so memory holds one batch, not the whole input. Every problem with
one file (unreadable, a model call that fails for it, NaN/Inf output) is reported on one line naming
the file and recorded in `Problems`; the other files go on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dcae.data.images import ImageReadError, image_size, load_image


@dataclass
class Problems:
    """Files that got no output, with the reason; printed to stderr as they happen."""

    unreadable: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)  # read, but the model (or its output) failed

    def unreadable_file(self, path: Path, message: str) -> None:
        self.unreadable.append({"file": str(path), "error": message})
        _say(message)

    def failed_file(self, path: Path, message: str) -> None:
        self.failed.append({"file": str(path), "error": message})
        _say(f"{path}: {message}")

    def files(self) -> list[str]:
        return [item["file"] for item in self.unreadable + self.failed]

    def __len__(self) -> int:
        return len(self.unreadable) + len(self.failed)


def _say(message: str) -> None:

    tqdm.write(f"dcae: {message}", file=sys.stderr)  # keeps an active progress bar intact


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` of an exception, for a per-file report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def plan(paths: list[Path], batch_size: int, problems: Problems) -> list[list[Path]]:
    """Batches of files of one size, in input order within a size; unreadable headers are reported."""
    groups: dict[tuple[int, int], list[Path]] = {}
    for path in paths:
        try:
            groups.setdefault(image_size(path), []).append(path)
        except (ImageReadError, FileNotFoundError) as exc:
            problems.unreadable_file(path, _read_message(path, exc))
    return [g[i : i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def _read_message(path: Path, exc: Exception) -> str:
    return f"cannot read image {path}: it does not exist" if isinstance(exc, FileNotFoundError) else str(exc)


def load_batch(paths: list[Path], problems: Problems) -> Iterator[tuple[list[Path], torch.Tensor]]:
    """Decode a planned batch: (paths, (B, 3, H, W) tensor) per image size (a header may have lied)."""
    loaded: dict[tuple[int, ...], list[tuple[Path, torch.Tensor]]] = {}
    for path in paths:
        try:
            img = load_image(path)
        except (ImageReadError, FileNotFoundError) as exc:
            problems.unreadable_file(path, _read_message(path, exc))
            continue
        loaded.setdefault(tuple(img.shape), []).append((path, img))
    for items in loaded.values():
        yield [p for p, _ in items], torch.stack([img for _, img in items])


def run_per_image_on_failure(
    fn: Callable[[torch.Tensor], torch.Tensor], paths: list[Path], x: torch.Tensor, what: str, problems: Problems
) -> Iterator[tuple[list[Path], torch.Tensor, torch.Tensor]]:
    """(paths, inputs, fn(inputs)); if fn fails on the batch, image by image, so that only the images it
    fails on are lost (each reported with the error)."""
    try:
        yield paths, x, fn(x)
        return
    except Exception as exc:  # out of memory included: one image at a time may fit
        if len(paths) == 1:
            problems.failed_file(paths[0], f"{what} failed ({one_line(exc)}); skipped")
            return
    for i, path in enumerate(paths):
        yield from run_per_image_on_failure(fn, [path], x[i : i + 1], what, problems)


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """A distinct output name per input: the file stem, or stem + extension (`photo_tif`) where two
    inputs share a stem, and a counter where even that repeats (same name in two folders)."""
    stems = [p.stem for p in paths]
    names = [p.stem if stems.count(p.stem) == 1 else p.name.replace(".", "_") for p in paths]
    seen: dict[str, int] = {}
    out: dict[Path, str] = {}
    for path, name in zip(paths, names):
        k = seen.get(name, 0)
        seen[name] = k + 1
        out[path] = name if k == 0 else f"{name}_{k + 1}"
    return out
