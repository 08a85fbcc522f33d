"""Session-wide test settings."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_backbone_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The dequantised GGUF backbone is cached on disk (pipecat_michi.model.checkpoint): the
    # tests share one fresh cache of their own, and leave the user's ~/.cache alone.
    os.environ.setdefault("PIPECAT_MICHI_CACHE", str(tmp_path_factory.mktemp("michi-cache")))
