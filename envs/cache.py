"""The one on-disk cache root every suite writes its generated games, catalogues and indexes under."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$SDAR_CACHE``; unset or empty: ``~/.cache/sdar_envs``."""
    return Path(os.environ.get("SDAR_CACHE") or Path.home() / ".cache" / "sdar_envs")
