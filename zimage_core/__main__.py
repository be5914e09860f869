"""`python -m zimage_core COMMAND …`; see cli.py."""

from .cli import main

raise SystemExit(main())
