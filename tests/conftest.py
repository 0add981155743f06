import os
import sys
from pathlib import Path

import pytest

# Test helpers (cache_harness, serving) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """The tiny float32 Llama + tokenizer, built from code (never downloaded)."""
    from sglang_tokenlake.tiny_model import TinyModelSpec, build

    cached = os.environ.get("TOKENLAKE_TEST_MODEL")
    if cached:  # a prebuilt copy (same spec) to save a few seconds locally
        return cached
    return str(build(TinyModelSpec(size="tiny", dtype="float32"), tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory) -> str:
    d = os.environ.get("TOKENLAKE_TEST_LOG_DIR")
    if d:
        Path(d).mkdir(parents=True, exist_ok=True)
        return d
    return str(tmp_path_factory.mktemp("server-logs"))
