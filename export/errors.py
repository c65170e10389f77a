"""Typed failures of the export stage, so callers (and the CLI) can tell causes apart."""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export step failed; nothing was written to the repository."""


class ProfileError(ValueError):
    """An image size or TensorRT optimisation profile is not valid for a patch-14 ViT."""


class RepositoryError(ValueError):
    """The model repository cannot be written or read (not writable, exists, malformed)."""


class ParityError(ExportError):
    """An exported graph or engine does not reproduce the reference features closely enough."""


class EngineMismatchError(ExportError):
    """A TensorRT engine was built for another GPU, TensorRT version or profile."""
