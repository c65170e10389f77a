"""Benchmark scripts run as `python benchmarks/X.py`, which puts `benchmarks/` on `sys.path`;
do the same here so the tests import them (and their `from common import ...`) the same way."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
