"""On a CUDA machine where gsplat is absent or its CUDA code cannot be built, rasterize(backend="auto") runs the
project's PyTorch rasteriser on CUDA with one warning, and `stag4d doctor` says so. Simulated on the CPU: the
conditions (a CUDA device, gsplat's import, its extension build) are monkeypatched; the dispatch is real."""

from __future__ import annotations

import importlib
import sys
import types
import warnings

import pytest
import torch

from stag4d_backend import doctor
from stag4d_backend.render import gsplat_backend

raster_mod = importlib.import_module("stag4d_backend.render.rasterize")
CUDA = torch.device("cuda")


@pytest.fixture
def fresh(monkeypatch):
    """A fresh status cache and warning flag; restored afterwards so other tests see the real machine."""
    monkeypatch.setattr(gsplat_backend, "_STATUS", None)
    monkeypatch.setattr(raster_mod, "_warned_fallback", False)
    yield monkeypatch


def _fake_gsplat(monkeypatch, C, version="1.5.3"):
    """Install a fake gsplat whose `gsplat.cuda._backend._C` is C (None = gsplat's failed JIT build), or whose
    extension import raises when C is an exception."""
    pkg = types.ModuleType("gsplat")
    pkg.__version__ = version
    cuda = types.ModuleType("gsplat.cuda")
    if isinstance(C, BaseException):
        class _Raise(types.ModuleType):
            def __getattr__(self, name):
                raise C
        backend = _Raise("gsplat.cuda._backend")
    else:
        backend = types.ModuleType("gsplat.cuda._backend")
        backend._C = C
    for name, mod in (("gsplat", pkg), ("gsplat.cuda", cuda), ("gsplat.cuda._backend", backend)):
        monkeypatch.setitem(sys.modules, name, mod)


def _dispatch_twice():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = raster_mod.resolve_backend("auto", CUDA, torch.float32)
        second = raster_mod.resolve_backend("auto", CUDA, torch.float32)
    return first, second, [w for w in caught if issubclass(w.category, raster_mod.GsplatFallbackWarning)]


def test_no_gsplat_on_cuda_uses_torch_with_one_warning(fresh):
    fresh.setattr(torch.cuda, "is_available", lambda: True)
    fresh.setitem(sys.modules, "gsplat", None)          # import gsplat -> ImportError
    first, second, warned = _dispatch_twice()
    assert (first, second) == ("torch", "torch")
    assert len(warned) == 1
    msg = str(warned[0].message)
    assert "gsplat is not installed" in msg and "PyTorch rasteriser on CUDA" in msg
    # an explicit request is refused with the same reason instead of falling back silently
    with pytest.raises(RuntimeError, match="gsplat is not installed"):
        raster_mod.resolve_backend("gsplat", CUDA, torch.float32)
    assert raster_mod.available_backends()[-1] == "torch" and "gsplat" not in raster_mod.available_backends()
    line = doctor.gsplat_report()
    assert line.startswith("NOT USABLE: gsplat is not installed") and "PyTorch rasteriser" in line


@pytest.mark.parametrize("C,why", [(None, "no CUDA toolkit"), (OSError("nvcc: not found"), "OSError: nvcc")])
def test_gsplat_that_cannot_build_uses_torch_with_one_warning(fresh, C, why):
    fresh.setattr(torch.cuda, "is_available", lambda: True)
    _fake_gsplat(fresh, C)
    first, second, warned = _dispatch_twice()
    assert (first, second) == ("torch", "torch") and len(warned) == 1
    msg = str(warned[0].message)
    assert "gsplat 1.5.3's CUDA code could not be built" in msg and why in msg
    st = gsplat_backend.gsplat_status()
    assert not st.usable and st.version == "1.5.3"
    assert "could not be built" in doctor.gsplat_report()


def test_usable_gsplat_is_chosen_without_warning(fresh):
    fresh.setattr(torch.cuda, "is_available", lambda: True)
    _fake_gsplat(fresh, object())
    first, second, warned = _dispatch_twice()
    assert (first, second) == ("gsplat", "gsplat") and warned == []
    assert doctor.gsplat_report() == "1.5.3, CUDA kernels usable: fits on CUDA use gsplat"


def test_cpu_machine(fresh):
    fresh.setattr(torch.cuda, "is_available", lambda: False)
    assert gsplat_backend.gsplat_status().reason == "no CUDA device"
    assert doctor.gsplat_report() == "not used (no CUDA device)"
    assert raster_mod.resolve_backend("auto", torch.device("cpu"), torch.float64) == "torch"
