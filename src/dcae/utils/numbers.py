"""What a number may be, by its meaning: one `Kind` per meaning (a count, a probability, a learning rate, a
guidance scale, ...), shared by the command line's option types (dcae.utils.cliargs) and the trainers' config
checks (dcae.diffusion.train.config, dcae.train.config), so that an option and a config field of the same
meaning refuse the same values with the same words.

    COUNT.problem(0)            -> "must be at least 1, got 0"
    PROBABILITY.problem(nan)    -> "must be in [0, 1], got nan"
    field_problems(problems, "optim.lr", cfg.optim.lr, POSITIVE)   # appends "optim.lr must be greater than 0, ..."

NaN and infinity are never a value of any kind (YAML reads `.nan` and `.inf`, Python's float() reads "nan" and
"inf"). Standard library only: the parsers import this module while `dcae --help` is built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Counts past this are typing mistakes (and overflow the int32 / int64 arithmetic of the libraries).
MAX_COUNT = 2**31 - 1
# Seeds: numpy takes 0 .. 2^32-1, and image i's generator is seeded by seed * 1_000_003 + i (dcae.diffusion.generation).
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Kind:
    """Numbers of one meaning: integers or reals, between `lo` and `hi` (None: unbounded; `*_open`: the bound
    itself excluded). `interval`: name both bounds when either is broken ("must be in [0, 1)"), for kinds whose
    both ends mean something; otherwise the broken side is named alone ("must be at least 1")."""

    integer: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    interval: bool = False

    def problem(self, value: object) -> str | None:
        """None when `value` is of this kind, else what is wrong in words: "must be ..., got VALUE"."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {'a whole number' if self.integer else 'a number'}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be {'in ' + self.interval_text() if self.interval else 'a finite number'}, got {_show(value)}"
        if self.integer and not float(value).is_integer():
            return f"must be a whole number, got {_show(value)}"
        low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        if not (low or high):
            return None
        if self.interval:
            return f"must be in {self.interval_text()}, got {_show(value)}"
        if low:
            return f"must be {'greater than' if self.lo_open else 'at least'} {_show(self.lo)}, got {_show(value)}"
        return f"must be {'less than' if self.hi_open else 'at most'} {_show(self.hi)}, got {_show(value)}"

    def interval_text(self) -> str:
        lo = "-inf" if self.lo is None else _show(self.lo)
        hi = "inf" if self.hi is None else _show(self.hi)
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def __call__(self, value: object) -> bool:
        """True when `value` is of this kind."""
        return self.problem(value) is None


def _show(value: float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))  # 0.0 -> 0, -1.0 -> -1 (config fields are floats even when written as 0)
    if isinstance(value, int) and abs(value) >= 1e16:
        return f"{float(value):g}"  # 10**30 -> 1e+30
    return repr(value) if isinstance(value, float) else str(value)


# ----------------------------------------------------------------------------- the kinds
COUNT = Kind(integer=True, lo=1, hi=MAX_COUNT)  # batch sizes, steps, images, shard sizes, intervals in steps
NONNEGATIVE_INT = Kind(integer=True, lo=0, hi=MAX_COUNT)  # counts where 0 means none / off (grid, warm-up steps)
SEED = Kind(integer=True, lo=0, hi=MAX_SEED)
WORKERS = Kind(integer=True, lo=0, hi=1024)  # worker processes (0: in the main process)
PATCH_SIZE = Kind(integer=True, lo=1, hi=64)  # a network's patch size
TOKENS = Kind(integer=True, lo=1, hi=65536)  # tokens per prompt
WIDTH = Kind(integer=True, lo=1, hi=65536)  # network sizes: depth, width, heads, channels (model.overrides)
FINITE = Kind()
POSITIVE = Kind(lo=0, lo_open=True)  # learning rates, epsilons, scales: finite and > 0
NONNEGATIVE = Kind(lo=0)  # weights, weight decay, clipping norms (0: off)
PROBABILITY = Kind(lo=0, hi=1, interval=True)  # shares and probabilities: dropout of conditions, flips, min_lr_ratio
FRACTION = Kind(lo=0, hi=1, hi_open=True, interval=True)  # decays and Adam's betas: 1 would never forget
GUIDANCE = Kind(lo=0, hi=100)  # classifier-free guidance scale (1: off); past 100 every image is saturated noise
SHIFT = Kind(lo=0, hi=100, lo_open=True)  # flow shift of the time grid (1: none; SD3 / SANA use about 3)
ETA = Kind(lo=0, hi=1, interval=True)  # DDIM stochasticity: 0 deterministic, 1 the full posterior noise
MINUTES = Kind(lo=0, hi=525_600, lo_open=True)  # a time budget, up to a year


def field_problems(problems: list[str], name: str, value: object, kind: Kind) -> None:
    """Append "NAME must be ..., got VALUE" to `problems` when `value` is not of `kind` (config checks)."""
    problem = kind.problem(value)
    if problem is not None:
        problems.append(f"{name} {problem}")


def fields_problems(obj: object, kinds: dict[str, Kind], prefix: str = "") -> list[str]:
    """One problem, "PREFIX+FIELD must be ..., got VALUE", for each dotted field of the config `obj` in `kinds`
    (field -> kind) whose value is not of its kind; fields left unset (None) are not checked."""
    problems: list[str] = []
    for name, kind in kinds.items():
        value = obj
        for part in name.split("."):
            value = getattr(value, part)
        if value is not None:
            field_problems(problems, prefix + name, value, kind)
    return problems


def items_problems(name: str, values, kind: Kind) -> list[str]:
    """One problem, "NAME[i] must be ..., got VALUE", for each item of the list `values` not of `kind`."""
    problems: list[str] = []
    for i, value in enumerate(values):
        field_problems(problems, f"{name}[{i}]", value, kind)
    return problems
