"""`python -m neco.serving --repository model_repository/ ...` == `neco serve ...`."""

from neco.serving.cli import main

raise SystemExit(main())
