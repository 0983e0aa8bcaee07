"""``python -m sdar_engine ...`` is the ``sdar`` command."""
from sdar_engine.cli import main

raise SystemExit(main())
