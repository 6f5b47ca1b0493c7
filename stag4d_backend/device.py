"""The one place a device name ("auto", "cpu", "cuda", "cuda:1", None) becomes a torch.device."""

from __future__ import annotations


class DeviceError(ValueError):
    """A device that cannot be used here (one line, names the fix)."""


def resolve_device(name=None) -> "torch.device":  # noqa: F821
    """None, "" and "auto" mean CUDA when present, else the CPU; a CUDA device where there is none is an error."""
    import torch

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {name}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return dev


__all__ = ["resolve_device", "DeviceError"]
