"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

from dcae.data.images import ImageReadError
from dcae.utils.io import OutputExistsError


class UserError(Exception):
    """Base for errors caused by the user's input (names, files, shapes), not by a bug."""


class UnknownModelError(UserError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class WeightsError(UserError):
    """Weights that do not fit the model: missing, unexpected or wrong-shape keys, corrupt files."""


class NonFiniteError(UserError, ValueError):
    """NaN or Inf in latents or images."""


# Existing exception types that are also user errors.
USER_ERROR_TYPES = (UserError, ImageReadError, OutputExistsError, FileNotFoundError)
