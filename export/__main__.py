"""`python -m neco.export ...` is `neco export ...`."""

import sys

from neco.cli import main

raise SystemExit(main(["export", *sys.argv[1:]]))
