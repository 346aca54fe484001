"""``python -m node.cli``: the ``mergeswarm`` console script (how the demo starts its peers)."""

from node.cli import main

raise SystemExit(main())
