"""`python -m neco.demo [--config configs/demo.yaml] [key=value ...]`."""

from neco.demo.run import main

raise SystemExit(main())
