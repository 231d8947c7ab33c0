"""``python -m seer`` runs the CLI."""

from seer.cli import main

raise SystemExit(main())
