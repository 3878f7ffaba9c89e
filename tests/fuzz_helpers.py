"""The contract every reader of the fuzz suite is held to, and the mutations it is fed (no tests here).

Contract: a damaged file gives either a result or ONE line (a user error whose message names the file); never
a traceback (an exception of another type), a hang (each call runs under a time limit) or a half-written
output (checked by the tests that write).

Examples per test: $DCAE_FUZZ_EXAMPLES (default 50, enough for every `make test`); a nightly job sets it to
thousands. Hypothesis keeps the failing examples it finds in .hypothesis/ and tries them first next time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import struct
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from dcae.errors import USER_ERROR_TYPES

EXAMPLES = int(os.environ.get("DCAE_FUZZ_EXAMPLES", "50"))
TIME_LIMIT_S = float(os.environ.get("DCAE_FUZZ_TIME_LIMIT", "20"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the time limit below stops a hang; a slow first call (imports) is not a failure
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("DCAE_FUZZ_RANDOM") is None,  # the same examples in every CI run, unless asked
)


@contextlib.contextmanager
def time_limit(seconds: float = TIME_LIMIT_S):
    """Fail (TimeoutError) instead of hanging: a reader must answer within `seconds`."""

    def on_alarm(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s (a hang?)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def result_or_one_line(call, path: Path, names: tuple[str, ...] = ()):
    """call() under the time limit: its result, or None after a one-line user error naming `path` (or one of
    `names`). Any other exception propagates: that is the bug the fuzz suite looks for."""
    try:
        with time_limit():
            return call()
    except USER_ERROR_TYPES as exc:
        assert_one_line_naming(str(exc), path, names)
        return None


def assert_one_line_naming(message: str, path: Path, names: tuple[str, ...] = ()) -> None:
    assert "\n" not in message.strip(), f"the error is not one line: {message!r}"
    shown = (str(path), Path(path).name, *names)
    assert any(s and s in message for s in shown), f"the error does not name {path}: {message!r}"


# ----------------------------------------------------------------------------- mutations
@st.composite
def mutated_bytes(draw, data: bytes) -> bytes:
    """`data` truncated, with bytes flipped, inserted or deleted (one to three edits)."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "zero_run"]))
        n = len(out)
        if op == "truncate":
            del out[draw(st.integers(0, max(n - 1, 0))) :]
        elif op == "flip" and n:
            i = draw(st.integers(0, n - 1))
            out[i] ^= draw(st.integers(1, 255))
        elif op == "insert":
            i = draw(st.integers(0, n))
            out[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            i = draw(st.integers(0, n - 1))
            del out[i : i + draw(st.integers(1, 16))]
        elif op == "zero_run" and n:
            i = draw(st.integers(0, n - 1))
            k = draw(st.integers(1, 64))
            out[i : i + k] = bytes(len(out[i : i + k]))
    return bytes(out)


def json_values():
    """Any JSON value, small: what a damaged or hand-edited field may hold instead of the right one."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**63),
        st.floats(allow_nan=False),
        st.sampled_from([0, -1, 1, 2**31, 1e308, "", "0", "nan", "inf", "-1", "1e9", "x" * 300]),
        st.text(max_size=12),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
        max_leaves=6,
    )


@st.composite
def mutated_json(draw, obj):
    """`obj` (a JSON structure) with one to three fields changed in value or type, removed, or added."""
    obj = json.loads(json.dumps(obj))
    for _ in range(draw(st.integers(1, 3))):
        paths = list(_paths(obj))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, key = _locate(obj, path)
        op = draw(st.sampled_from(["replace", "replace", "remove", "add"]))
        if op == "replace":
            parent[key] = draw(json_values())
        elif op == "remove" and isinstance(parent, dict):
            parent.pop(key, None)
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(json_values())
    return obj


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _locate(obj, path):
    for k in path[:-1]:
        obj = obj[k]
    return obj, path[-1]


# ----------------------------------------------------------------------------- safetensors
def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    """(header dict, tensor bytes) of a .safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_safetensors(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar shard holding `members` (name -> bytes), in that order."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buf.getvalue()


@st.composite
def damaged_shard(draw, members: dict[str, bytes]) -> bytes:
    """A tar shard of `members` with one member's bytes damaged, or the shard's own bytes damaged."""
    if draw(st.booleans(), label="damage a member"):
        key = draw(st.sampled_from(sorted(members)))
        return tar_bytes({**members, key: draw(mutated_bytes(members[key]))})
    return draw(mutated_bytes(tar_bytes(members)), label="shard bytes")
