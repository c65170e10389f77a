"""Typed failures of loading or saving a backbone."""

from __future__ import annotations

from neco.errors import NecoError


class WeightsError(NecoError, ValueError):
    """A weight source cannot be loaded into the requested backbone."""


class ArchitectureMismatchError(WeightsError):
    """The weights were trained for another architecture (width, depth or registers)."""
