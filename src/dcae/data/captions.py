"""Captioned images for text-to-image training, in the forms people have them, on the one image source
(`dcae.data.sources`: its references, listing, reader and policy for what cannot be read).

Sources of `list_captioned`, in the order given: image folders (as `list_images`) with sidecar captions
(`photo.jpg` + `photo.txt`, else `.caption`, else `.json` with a "caption" / "text" / "prompt" string; names
in any case); `.jsonl` / `.ndjson` / `.csv` / `.tsv` manifests with an image and a caption column (among
`IMAGE_COLUMNS` / `CAPTION_COLUMNS` in any case, in JSONL the one most rows have, unless named; paths
relative to the manifest's folder; local files only, a URL is refused by name); webdataset `.tar` shards as
img2dataset writes them (`000000001.jpg` + `.txt`, or `.json` with a "caption"), grouped by key like
webdataset (the member name up to the first dot of its file name); globs and `{000..009}` as `list_images`.

Policy (`dcae.data.sources`'): named, skipped and counted in `.skipped` (the first `WARN_FIRST` in warnings,
then one warning with the counts): broken shards; images without a caption or with an empty one (kept with
"" under `keep_uncaptioned`); caption files that cannot be read or parsed (always); manifest lines by number
(`data.csv:7: ...`) that are not a JSON object / a CSV record of the header's length, or whose image is
missing, not a file or a URL, or whose caption is absent or empty; exact duplicates (the same image, by its
real path and tar member, with the same caption: the first is kept; the same image with another caption is
another item). A source (folder, manifest, shard, file) given a second time is listed once: the second is
one "repeated source" record. Nothing usable left: a one-line UserError naming the sources and the first
problem; nothing found: a UserError.

Captions: UTF-8 (a BOM dropped); each byte that is not UTF-8 becomes U+FFFD and the caption is kept and
counted (`CaptionList.replaced`, one warning naming the first); control characters become spaces, whitespace
is stripped and collapsed. A caption file over `MAX_CAPTION_BYTES` is refused as damaged. Buckets of
aspect ratios: `dcae.data.buckets`; `read_captioned(item, size)` reads an image cut to its bucket.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import stat
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dcae.data.buckets import resize_to_bucket
from dcae.data.sources import (
    SKIMAGE,
    TAR_ERRORS,
    ImageRef,
    Naming,
    Skipped,
    Source,
    expand_paths,
    list_refs,
    nothing_readable,
    one_line,
    read_image,
    record_skip,
)
from dcae.errors import UserError

CAPTION_SUFFIXES = ("txt", "caption", "json")  # sidecar / webdataset field, in order of preference
CAPTION_KEYS = ("caption", "text", "prompt")  # in a JSON sidecar or member
IMAGE_COLUMNS = ("image", "file_name", "filename", "file", "path", "image_path", "url")
CAPTION_COLUMNS = CAPTION_KEYS
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": ",", ".tsv": "\t"}
MAX_CAPTION_BYTES = 1 << 20
WARN_FIRST = 10
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_WDS_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass(frozen=True)
class Captioned:
    """One image and its caption."""

    ref: ImageRef
    caption: str

    @property
    def name(self) -> str:
        return self.ref.name


class CaptionList(list):
    """The usable captioned images of a listing (a list of `Captioned`), with what was skipped (`skipped`),
    the sources, and how many captions had bytes that are not UTF-8 (`replaced`)."""

    def __init__(self, items=(), skipped: Sequence[Skipped] = (), sources: Sequence[Source] = (), replaced=0):
        super().__init__(items)
        self.skipped = list(skipped)
        self.sources = [str(s) for s in sources]
        self.replaced = replaced

    def head(self, limit: int | None) -> CaptionList:
        return self if limit is None else CaptionList(self[:limit], self.skipped, self.sources, self.replaced)


class _Problem(Exception):
    """Why a caption or manifest line cannot be used (one line); `damaged`: skipped even when uncaptioned
    images are kept."""

    def __init__(self, message: str, damaged: bool = True):
        super().__init__(message)
        self.damaged = damaged


class _Listing:
    """What one `list_captioned` call collects: records, skips (the first WARN_FIRST named in warnings), and
    what was listed (to skip exact duplicates)."""

    def __init__(self, keep_uncaptioned: bool):
        self.keep = keep_uncaptioned
        self.items: list[Captioned] = []
        self.skipped: list[Skipped] = []
        self.replaced: list[str] = []
        self.seen: dict[tuple[str, str | None, str], str] = {}  # (real path, member, caption) -> where first
        self.folders: dict[str, str] = {}  # folder -> its real path

    def skip(self, item: Skipped) -> None:
        warn = len(self.skipped) < WARN_FIRST or item.what == "repeated source"  # few, and always said
        if item.what in DUPLICATES:  # not unreadable: said as it is
            if warn:
                warnings.warn(f"skipping {item.what}: {item.error}", stacklevel=3)
            warn = False
        record_skip(self.skipped, item, warn=warn)

    def add(self, ref: ImageRef, caption: str | None, where: str, problem: _Problem | None = None, line=None):
        """`caption` (raw text, from `where`), or the problem that left the image without one; `line`: the
        manifest line (`<manifest>:<n>`) it came from."""
        if problem is None:
            caption, replaced = clean_caption(caption or "")
            if replaced:
                self.replaced.append(ref.name)
            if not caption:
                problem = _Problem(f"empty caption for {ref.location} in {where}", damaged=False)
        if problem is not None and (problem.damaged or not self.keep):
            self.skip(Skipped(line or ref.name, str(problem), "manifest line" if line else "image"))
            return
        caption, name = "" if problem else caption, line or ref.name
        key = (self._real(ref.path) if ref.kind != "skimage" else ref.path, ref.member, caption)
        if key in self.seen:
            self.skip(Skipped(name, f"{name}: {ref.location} with the caption {_shown(caption, 60)} is listed "
                              f"already ({self.seen[key]})", "duplicate"))  # fmt: skip
            return
        self.seen[key] = name
        self.items.append(Captioned(ref, caption))

    def _real(self, path: str) -> str:
        """The real path of a file: its folder's resolved once per folder, then the file's own link."""
        folder, name = os.path.split(path)
        if folder not in self.folders:
            self.folders[folder] = os.path.realpath(folder or ".")
        full = os.path.join(self.folders[folder], name)
        return os.path.realpath(full) if os.path.islink(full) else full


DUPLICATES = ("duplicate", "repeated source")  # what `.skipped` records that is readable but listed already


def clean_caption(text: str) -> tuple[str, bool]:
    """(the caption stripped, control characters and runs of whitespace made single spaces, whether it had
    bytes that were not UTF-8 (surrogates), now U+FFFD)."""
    replaced = _SURROGATE.search(text) is not None
    if replaced:
        text = _SURROGATE.sub("\ufffd", text)
    return " ".join(_CONTROL.sub(" ", text).split()), replaced


def _decode(data: bytes) -> str:
    """UTF-8 without BOM; each byte that is not UTF-8 kept as a surrogate (counted, then replaced)."""
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")


def _shown(value, most: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def _caption_of(data: bytes, suffix: str, where: str) -> str | None:
    """The caption in a sidecar / member's bytes (None: absent); _Problem when it cannot be used."""
    text = _decode(data)
    if suffix != "json":
        return text
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Problem(f"cannot read caption file {where}: not JSON ({one_line(exc)})") from None
    if not isinstance(obj, dict):
        raise _Problem(f"cannot read caption file {where}: not a JSON object")
    lowered = {k.strip().lower(): v for k, v in obj.items()}
    values = [(k, lowered[k]) for k in CAPTION_KEYS if lowered.get(k) is not None]
    if not values:
        raise _Problem(f"no caption in {where} (no {' / '.join(CAPTION_KEYS)} key)", damaged=False)
    key, value = values[0]
    if not isinstance(value, str):
        raise _Problem(f"cannot read caption file {where}: its {key!r} is {type(value).__name__}, not text")
    return value


# ----------------------------------------------------------------------------------------- listing
def list_captioned(
    sources: Source | Sequence[Source],
    naming: Naming = "relative",
    keep_uncaptioned: bool = False,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> CaptionList:
    """Every captioned image of `sources` (see the module's docstring for the forms, the policy and the
    captions); `naming` as in `list_images` (a manifest's images: relative to its folder, or their path)."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    sources = [str(s) for s in sources]
    out = _Listing(keep_uncaptioned)
    given: dict[str, str] = {}  # real path -> the source that gave it first
    for source in sources:
        if source.startswith(f"{SKIMAGE}:"):
            _add_images(out, source, naming)
            continue
        paths = expand_paths(source)
        pattern = glob.has_magic(source) or "{" in source
        for path in paths:
            suffix = path.suffix.lower()
            if not path.exists():
                raise FileNotFoundError(f"{path} does not exist")
            if not path.is_dir() and pattern and suffix.lstrip(".") in CAPTION_SUFFIXES:
                continue  # a pattern's sidecars: read with their images
            real = os.path.realpath(path)
            if real in given:
                again = "" if given[real] == str(path) else f" (as {given[real]})"
                out.skip(Skipped(str(path), f"{path} is given twice in the sources{again}: listed once",
                                 "repeated source"))  # fmt: skip
                continue
            given[real] = str(path)
            if path.is_dir():
                _add_images(out, glob.escape(str(path)), naming)
            elif suffix in MANIFEST_SUFFIXES:
                _add_manifest(out, path, naming, image_column, caption_column)
            else:
                _add_images(out, glob.escape(str(path)), naming)
    if out.replaced:
        warnings.warn(
            f"{len(out.replaced)} caption(s) had bytes that are not UTF-8, replaced by U+FFFD "
            f"(first: {out.replaced[0]})",
            stacklevel=2,
        )
    if len(out.skipped) > WARN_FIRST:
        kinds = Counter(s.what for s in out.skipped)
        warnings.warn(
            f"skipped {len(out.skipped)} in all ({', '.join(f'{n} {k}' for k, n in kinds.items())}); "
            f"the first {WARN_FIRST} are named above, all in the listing's .skipped",
            stacklevel=2,
        )
    if not out.items and out.skipped:
        raise nothing_readable(sources, out.skipped)
    if not out.items:
        looked = "images with .txt / .caption / .json captions, .tar shards, .jsonl / .csv manifests"
        raise UserError(
            f"no captioned images found in {', '.join(sources[:3])}{' ...' * (len(sources) > 3)} ({looked})"
        )
    return CaptionList(out.items, out.skipped, sources, len(out.replaced))


def _add_images(out: _Listing, source: str, naming: Naming) -> None:
    refs, skipped = list_refs([source], naming)
    for item in skipped:
        out.skip(item)
    folders: dict[str, dict[str, str]] = {}  # folder -> lower-case name -> name
    shards: dict[str, dict[str, dict[str, bytes | _Problem]] | None] = {}
    for ref in refs:
        if ref.kind == "file":
            _add_sidecar(out, ref, folders)
        elif ref.kind == "tar":
            if ref.path not in shards:
                shards[ref.path] = _shard_captions(out, ref.path)
            if shards[ref.path] is not None:  # else skipped whole
                _add_member(out, ref, shards[ref.path])
        else:
            out.add(ref, None, SKIMAGE, _Problem(f"no caption for {ref.location} (a scikit-image photo)", False))


def _add_sidecar(out: _Listing, ref: ImageRef, folders: dict[str, dict[str, str]]) -> None:
    path = Path(ref.path)
    folder = str(path.parent)
    if folder not in folders:
        try:
            folders[folder] = {n.lower(): n for n in sorted(os.listdir(folder), reverse=True)}
        except OSError:
            folders[folder] = {}
    names = folders[folder]
    for suffix in CAPTION_SUFFIXES:
        name = names.get(f"{path.stem}.{suffix}".lower())
        if name is None:
            continue
        sidecar = path.parent / name
        try:
            if not stat.S_ISREG(os.stat(sidecar).st_mode):
                raise _Problem(f"cannot read caption file {sidecar}: not a regular file")
            with open(sidecar, "rb") as f:
                data = f.read(MAX_CAPTION_BYTES + 1)
            if len(data) > MAX_CAPTION_BYTES:
                raise _Problem(f"cannot read caption file {sidecar}: larger than {MAX_CAPTION_BYTES} bytes")
            return out.add(ref, _caption_of(data, suffix, str(sidecar)), str(sidecar))
        except _Problem as problem:
            return out.add(ref, None, str(sidecar), problem)
        except OSError as exc:
            return out.add(ref, None, str(sidecar), _Problem(f"cannot read caption file {sidecar}: {one_line(exc)}"))
    tried = ", ".join(f"{path.stem}.{s}" for s in CAPTION_SUFFIXES)
    out.add(ref, None, folder, _Problem(f"no caption for {ref.path} (none of {tried})", damaged=False))


def sample_key(member: str) -> tuple[str | None, str | None]:
    """(key, field) of a tar member as webdataset groups them: `a/000001.seg.png` -> ("a/000001", "seg.png");
    (None, None) for a name without a dot in its file name."""
    m = _WDS_KEY.match(member)
    return (m.group(1), m.group(2)) if m else (None, None)


def _shard_captions(out: _Listing, path: str) -> dict[str, dict[str, bytes | _Problem]] | None:
    """key -> field -> caption bytes (or the problem reading them) of a shard's caption members; None
    (and the shard skipped) when the shard cannot be read now."""
    found: dict[str, dict[str, bytes | _Problem]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key, field = sample_key(member.name)
                field = (field or "").lower()
                if not member.isfile() or field not in CAPTION_SUFFIXES:
                    continue
                where = f"{path}:{member.name}"
                if member.size > MAX_CAPTION_BYTES:
                    value = _Problem(f"cannot read caption file {where}: larger than {MAX_CAPTION_BYTES} bytes")
                else:
                    try:
                        value = tar.extractfile(member).read()
                    except TAR_ERRORS as exc:
                        value = _Problem(f"cannot read caption file {where}: {one_line(exc)}")
                found.setdefault(key, {}).setdefault(field, value)
    except TAR_ERRORS as exc:
        out.skip(Skipped(path, f"cannot read tar shard {path}: {one_line(exc)}", "tar shard"))
        return None
    return found


def _add_member(out: _Listing, ref: ImageRef, captions: dict[str, dict[str, bytes | _Problem]]) -> None:
    key, _ = sample_key(ref.member)
    fields = captions.get(key, {})
    for suffix in CAPTION_SUFFIXES:
        if suffix in fields:
            value, where = fields[suffix], f"{ref.path}:{key}.{suffix}"
            try:
                if isinstance(value, _Problem):
                    raise value
                return out.add(ref, _caption_of(value, suffix, where), where)
            except _Problem as problem:
                return out.add(ref, None, where, problem)
    tried = "/".join(f".{s}" for s in CAPTION_SUFFIXES)
    out.add(ref, None, ref.path, _Problem(f"no caption for {ref.location} (no {key} {tried} member)", False))


# ----------------------------------------------------------------------------------------- manifests
def _add_manifest(out: _Listing, path: Path, naming: Naming, image_column: str | None, caption_column: str | None):
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    try:
        if not path.is_file():  # a FIFO would block
            raise OSError("not a regular file")
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="" if kind != "jsonl" else None) as f:
            columns, rows = _jsonl_rows(f) if kind == "jsonl" else _csv_rows(f, kind)
    except OSError as exc:  # (no UnicodeError: surrogateescape)
        out.skip(Skipped(str(path), f"cannot read manifest {path}: {one_line(exc)}", "manifest"))
        return
    if any(isinstance(row, dict) for _, row in rows):
        image_key = _column(path, columns, image_column, IMAGE_COLUMNS, "image")
        caption_key = _column(path, columns, caption_column, CAPTION_COLUMNS, "caption")
    for number, row in rows:
        line = f"{path}:{number}"
        if isinstance(row, str):
            out.skip(Skipped(line, f"{line}: {row}", "manifest line"))
            continue
        try:
            ref = _manifest_ref(path, row.get(image_key), naming, line)
        except _Problem as problem:
            out.skip(Skipped(line, str(problem), "manifest line"))
            continue
        value = row.get(caption_key)
        if value is None or value == "":
            out.add(ref, None, line, _Problem(f"{line}: no caption for {ref.location}", damaged=False), line)
        elif not isinstance(value, str):
            out.add(ref, None, line, _Problem(f"{line}: the caption is {type(value).__name__}, not text"), line)
        else:
            out.add(ref, value, line, line=line)


def _jsonl_rows(lines: Iterable[str]) -> tuple[Counter, list[tuple[int, dict | str]]]:
    """(how many objects have each key, lower case; per non-blank line: (line number, the object with
    lower-case keys) or (line number, why it is not one))."""
    columns: Counter = Counter()
    rows: list[tuple[int, dict | str]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError) as exc:
            rows.append((number, f"not JSON ({one_line(exc)})"))
            continue
        if not isinstance(obj, dict):
            rows.append((number, f"not a JSON object ({type(obj).__name__})"))
            continue
        obj = {k.strip().lower(): v for k, v in obj.items()}
        columns.update(obj.keys())
        rows.append((number, obj))
    return columns, rows


def _csv_rows(lines: Iterable[str], delimiter: str) -> tuple[Counter, list[tuple[int, dict | str]]]:
    """(the header's columns, lower case; per record after it: (its first line, column -> value) or (its
    first line, why it cannot be used)). Blank lines are passed over."""
    reader = csv.reader(lines, delimiter=delimiter)
    header: list[str] | None = None
    rows: list[tuple[int, dict | str]] = []
    start = 1
    while True:
        before = reader.line_num
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            rows.append((start, f"not a CSV record ({one_line(exc)})"))
            if reader.line_num == before:
                break
            start = reader.line_num + 1
            continue
        number, start = start, reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue
        if header is None:
            header = [h.strip().lower() for h in record]
        elif len(record) != len(header):
            rows.append((number, f"{len(record)} fields where the header has {len(header)}"))
        else:
            rows.append((number, dict(zip(header, record))))
    return Counter(header or ()), rows


def _column(path: Path, have: Counter, given: str | None, candidates: Sequence[str], what: str) -> str:
    """The column (lower case): `given`, else the candidate that most rows have (ties: the first listed)."""
    found = _shown([c for c, _ in have.most_common(20)], 300)
    if given is not None:
        if given.strip().lower() in have:
            return given.strip().lower()
        raise UserError(f"manifest {path} has no {what} column {given!r} (columns: {found})")
    best = max(candidates, key=lambda c: (have[c], -candidates.index(c)))
    if have[best]:
        return best
    raise UserError(
        f"manifest {path}: no {what} column among {', '.join(candidates)} (columns: {found}); "
        f"name it with {what}_column="
    )


def _manifest_ref(manifest: Path, value, naming: Naming, where: str) -> ImageRef:
    if value is None or value == "":
        raise _Problem(f"{where}: no image path", damaged=False)
    if not isinstance(value, str):
        raise _Problem(f"{where}: the image path is {type(value).__name__}, not text")
    if _URL.match(value.strip()):
        raise _Problem(f"{where}: {_shown(value.strip())} is a URL; only local files are read (download first)")
    path = manifest.parent / value.strip()
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:  # missing, a NUL in the name, too long, not encodable
        reason = "does not exist" if isinstance(exc, FileNotFoundError) else one_line(exc)
        raise _Problem(f"{where}: image {_shown(value)}: {reason}", damaged=False) from None
    if not stat.S_ISREG(st.st_mode):
        raise _Problem(f"{where}: image {_shown(value)} is not a file", damaged=False)
    name = os.path.relpath(path, manifest.parent) if naming == "relative" else str(path)
    return ImageRef(Path(name).as_posix(), str(path), size=st.st_size, mtime=st.st_mtime)


# ----------------------------------------------------------------------------------------- reading
def read_captioned(item: Captioned, size: tuple[int, int] | None = None) -> tuple[np.ndarray, str]:
    """(HxWx3 uint8, upright, cut to `size` = (height, width) with `resize_to_bucket` when given, the
    caption); ImageReadError naming the image as `read_image`."""
    arr = read_image(item.ref)
    return (arr if size is None else resize_to_bucket(arr, size)), item.caption
