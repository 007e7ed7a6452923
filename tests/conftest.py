import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("POLYALIGN_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.exists():
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of builtin:tiny-random, built once per session."""
    from polyalign.models import load_model, load_tokenizer

    return load_model("builtin:tiny-random"), load_tokenizer("builtin:tiny-random")


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    # Each test gets its own empty cache; real-model tests reuse the user's (the model is built once).
    if request.node.get_closest_marker("real_model") is None:
        monkeypatch.setenv("POLYALIGN_CACHE", str(tmp_path / "cache"))
