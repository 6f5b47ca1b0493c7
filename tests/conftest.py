"""Test-wide settings: keep Blender (bpy) and caches out of the user's home, find the shared data."""

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="stag4d-tests-"))
# bpy writes preferences and caches under the home directory; point it at throwaway folders.
os.environ.setdefault("BLENDER_USER_RESOURCES", str(_TMP / "blender"))
os.environ.setdefault("XDG_CACHE_HOME", str(_TMP / "cache"))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STAG4D_SHARED", REPO.parent / "shared"))
MINIONS = SHARED / "data" / "minions"


@pytest.fixture
def minions_dir() -> Path:
    """The STAG4D authors' minions data (../shared/data/minions); tests that need it skip where it is absent."""
    if not (MINIONS / "ref").is_dir():
        pytest.skip(f"shared data not found at {MINIONS}")
    return MINIONS


@pytest.fixture
def one_torch_thread():
    """Tiny tensors on a shared 2-core machine: one torch thread is far faster than two under contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
