"""``python -m zimage``: see :mod:`zimage.cli`."""

from .cli import main

raise SystemExit(main())
