"""STAG4D backend: video/image/text to animated 3D Gaussians (see docs/architecture.md)."""

__version__ = "0.1.0"
