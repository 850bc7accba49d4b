"""Test-session setup: an isolated factor cache, so tests never touch the user's home directory."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the SVD cache of the test run out of the user's home directory."""
    mp = pytest.MonkeyPatch()
    mp.setenv("SVDTUNE_CACHE_DIR", str(tmp_path_factory.mktemp("svdtune-cache")))
    yield
    mp.undo()
