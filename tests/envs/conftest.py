"""Fixtures shared by the environment tests."""
import os

import pytest


@pytest.fixture(scope="module")
def fresh_alfworld_cache(tmp_path_factory):
    """An empty game cache for one test module: $SDAR_CACHE points at it (worker processes see it
    too) and $ALFWORLD_DATA is unset, so games are generated; both are restored afterwards."""
    path = tmp_path_factory.mktemp("sdar_cache")
    saved = {k: os.environ.get(k) for k in ("SDAR_CACHE", "ALFWORLD_DATA")}
    os.environ["SDAR_CACHE"] = str(path)
    os.environ.pop("ALFWORLD_DATA", None)
    yield path
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
