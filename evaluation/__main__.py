"""`python -m neco.evaluation hummingbird|linear ...` == `neco eval hummingbird|linear ...`."""

import sys

from neco.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["eval", *sys.argv[1:]]))
