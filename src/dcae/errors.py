"""User-facing errors: the CLI prints these as one line, without a traceback.

Standard library only, and no dcae module: any module can import this one at module level, cheaply (no
torch, numpy or PIL) and without an import cycle.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from collections.abc import Iterator


class UserError(Exception):
    """Base for errors caused by the user's input (names, files, shapes), not by a bug."""


class UnknownModelError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(UserError):
    """Weights that do not fit the model: missing, unexpected or wrong-shape keys, corrupt files."""


class NonFiniteError(UserError, ValueError):
    """NaN or Inf in latents or images."""


class PathError(UserError):
    """A path given for input or output that cannot be used: the wrong kind (a file where a folder is
    needed, or the other way round), a folder that cannot be created or written, a link to a missing
    file. Raised by the checks of dcae.utils.io; the message names the path and what is wrong."""


class MissingInputError(PathError, FileNotFoundError):
    """An input path that does not exist (or is a link to a missing file)."""


class NonFiniteWarning(RuntimeWarning):
    """NaN or Inf in weights, latents or decoded images; the message says which tensor or file."""


class ImageReadError(OSError):
    """An image file could not be read or decoded (raised by dcae.data.images, importable from there too)."""


class OutputExistsError(FileExistsError):
    """Raised when an output exists and the caller did not ask to overwrite it (see dcae.utils.io)."""


# Exception types that are user errors without deriving from UserError.
USER_ERROR_TYPES = (UserError, ImageReadError, OutputExistsError, FileNotFoundError)


@contextlib.contextmanager
def non_finite_warnings_as_lines() -> Iterator[None]:
    """For commands: each NonFiniteWarning raised inside (e.g. NaN weights found at load) is printed as
    one `dcae: warning:` line instead of Python's warning format; other warnings pass on unchanged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteWarning)
        yield
    for w in caught:
        if issubclass(w.category, NonFiniteWarning):
            print(f"dcae: warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def brief(exc: BaseException, limit: int = 300) -> str:
    """The gist of an exception's message in one line, for errors that name a file. torch.load's weights-only
    refusal (a dozen lines of advice) becomes its 'WeightsUnpickler error' line."""
    text = _ANSI.sub("", str(exc))
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if unpickler:
        text = "damaged, or not a weights-only file: " + unpickler.group(1)
    words = " ".join(text.split())
    return (words[:limit] + " ...") if len(words) > limit else (words or type(exc).__name__)
