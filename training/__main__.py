"""`python -m neco.training --config ... [key=value ...]`: same as `neco train`."""

from __future__ import annotations

import sys

from neco.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *sys.argv[1:]]))
