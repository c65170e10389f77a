"""Typed failures of the export stage, so callers (and the CLI) can tell causes apart."""

from __future__ import annotations

from neco.errors import NecoError
from neco.triton_config import RepositoryError

__all__ = ["EngineMismatchError", "ExportError", "ParityError", "ProfileError", "RepositoryError"]


class ExportError(NecoError, RuntimeError):
    """An export step failed; nothing was written to the repository."""


class ProfileError(NecoError, ValueError):
    """An image size or TensorRT optimisation profile is not valid for a patch-14 ViT."""


class ParityError(ExportError):
    """An exported graph or engine does not reproduce the reference features closely enough."""


class EngineMismatchError(ExportError):
    """A TensorRT engine was built for another GPU, TensorRT version or profile."""
