"""Fixtures every integration test module may use (module-specific clusters stay in their modules;
helpers that start real nodes live in tests/support/cluster.py)."""

from __future__ import annotations

import pytest

from pdserve.models.loader import default_model_dir
from pdserve.models.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The bundled demo model's tokenizer."""
    return Tokenizer.from_dir(default_model_dir())
