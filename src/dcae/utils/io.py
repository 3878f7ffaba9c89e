"""Atomic file output: every file the project writes goes through a temp file + rename,
so that a crash never leaves a half-written checkpoint, latent shard or image behind.

The files get the mode a plain `open(path, "w")` would give them, 0o666 & ~umask (0o644 under the usual umask
022: colleagues on a shared machine can read caches, checkpoints and exported pipelines), not the 0o600 of
tempfile.mkstemp's temp file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dcae.errors import MissingInputError, OutputExistsError, PathError  # defined there (cheap to import), raised here


def check_writable(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to clobber an existing output unless `overwrite` is set."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists (pass --overwrite / overwrite=True to replace it)")
    return path


# ----------------------------------------------------------------------------- path checks
# Commands call these first, before any model is loaded or any output opened: a path that cannot be used
# is one `dcae: error:` line naming it and what is wrong (PathError, a UserError), and nothing is written.


def check_input(path: str | os.PathLike, what: str = "input", must_exist: bool = True) -> Path:
    """An input path that can be read: a link to a missing file (the path, or a folder above it) is named
    with its target. `must_exist=False` for arguments that may also be a name rather than a path (a Hub id,
    a zoo name, a glob): then only a path that is a link to nothing is refused."""
    p = Path(path)
    if os.path.exists(p):
        return p
    if _is_dangling(p):
        raise MissingInputError(f"{what} {p} is a link to a missing file {_link_target(p)}")
    if not must_exist:
        return p
    for parent in p.parents:
        if _is_dangling(parent):
            raise MissingInputError(
                f"{what} {p} does not exist: {parent} is a link to a missing folder {_link_target(parent)}"
            )
    raise MissingInputError(f"{what} {p} does not exist")


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """An output folder that exists and can be written, or can be created: not an existing file, not a
    link to nothing, and its nearest existing parent is a folder this process can write in."""
    p = Path(path)
    if p.is_dir():  # a link to a folder is fine
        _check_can_write_in(p, what, p, "cannot be written")
        return p
    if _is_dangling(p):
        raise PathError(f"{what} {p} is a link to a missing folder {_link_target(p)}")
    if os.path.lexists(p):
        kind = "is an existing file" if p.is_file() else "exists and is"
        raise PathError(f"{what} {p} {kind}, not a folder")
    _check_creatable(p, what)
    return p


def check_output_file(path: str | os.PathLike, overwrite: bool = False, what: str = "output file") -> Path:
    """An output file that can be written atomically: not an existing folder, an existing file only with
    `overwrite` (OutputExistsError otherwise), and its folder exists and can be written or can be created."""
    p = Path(path)
    if p.is_dir():
        raise PathError(f"{what} {p} is an existing folder, not a file")
    if os.path.lexists(p):
        if not overwrite:
            raise OutputExistsError(f"{p} already exists (pass --overwrite / overwrite=True to replace it)")
        _check_can_write_in(p.parent, what, p, "cannot be replaced")  # the rename needs the folder
    else:
        _check_creatable(p, what)
    return p


def _is_dangling(p: Path) -> bool:
    return p.is_symlink() and not os.path.exists(p)


def _link_target(p: Path) -> str:
    try:
        return os.path.realpath(p)  # the missing end of a chain of links
    except (OSError, RuntimeError):  # a loop of links (older Pythons)
        return os.readlink(p)


def _check_creatable(p: Path, what: str) -> None:
    """`p` does not exist: its nearest existing parent must be a folder that can be written in."""
    base = next((q for q in p.parents if os.path.lexists(q)), Path("."))
    if _is_dangling(base):
        raise PathError(f"{what} {p} cannot be created: {base} is a link to a missing folder {_link_target(base)}")
    if not base.is_dir():
        raise PathError(f"{what} {p} cannot be created: {base} is a file, not a folder")
    _check_can_write_in(base, what, p, "cannot be created")


def _check_can_write_in(folder: Path, what: str, p: Path, verb: str) -> None:
    """Permission bits first, then a real try (root passes every permission check, but not a read-only
    or virtual file system): a temp file created and removed in `folder`."""
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{what} {p} {verb}: no permission to write in {folder}")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".dcae-write-check.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise PathError(f"{what} {p} {verb}: cannot write in {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


def current_umask() -> int:
    """The process's umask. Linux shows it in /proc/self/status, read without changing it (so a umask set after
    import counts, and no other thread ever sees a changed one); elsewhere it is read once, by setting it to 0 and
    back at once."""
    global _UMASK
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if _UMASK is None:
        _UMASK = os.umask(0)
        os.umask(_UMASK)
    return _UMASK


_UMASK: int | None = None


def new_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask's bits."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path`.

    The temp file lives in the same directory so that the final `os.replace` is atomic.
    """
    path = Path(path)
    if not overwrite:
        check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp made it 0o600, and a writer may have replaced it with a file of its own (safetensors does):
        # the mode is set last, on what is renamed into place.
        os.chmod(tmp_path, new_file_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def atomic_torch_save(obj: Any, path: str | os.PathLike, overwrite: bool = True) -> Path:

    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def atomic_save_safetensors(
    tensors: dict, path: str | os.PathLike, metadata: dict | None = None, overwrite: bool = True
) -> Path:

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)
