"""`python -m neco.client ...`: the client's CLI without torch or the other stages."""

from neco.client.cli import main

raise SystemExit(main())
