"""Values the engine and the suites share are defined once: the cache root, the retrieval methods."""
from pathlib import Path

import pytest

from sdar_envs import base, cache, skills


def test_every_suite_uses_the_one_cache_root(monkeypatch, tmp_path):
    from sdar_envs.alfworld import suite
    from sdar_envs.searchqa import retriever
    from sdar_envs.webshop import catalogue

    assert suite.cache_root is retriever.cache_root is catalogue.cache_root is cache.cache_root
    monkeypatch.setenv("SDAR_CACHE", str(tmp_path))
    assert cache.cache_root() == tmp_path
    monkeypatch.setenv("SDAR_CACHE", "")  # empty = unset (not the working directory)
    assert cache.cache_root() == Path.home() / ".cache" / "sdar_envs"


def test_retrieval_methods_come_from_the_skill_module():
    from sdar_engine import config, teacher

    assert config.RETRIEVALS is teacher.RETRIEVALS is base.RETRIEVALS is skills.RETRIEVALS
    with pytest.raises(ValueError, match=r"env.retrieval='bm25'.*keyword, full, random, ucb"):
        config.from_dict({}, ["env.retrieval=bm25"], check_paths=False)
