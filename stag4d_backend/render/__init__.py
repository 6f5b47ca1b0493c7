"""Gaussian rasterisation. ``rasterize`` is the one public entry point (see docs/rasterizer.md)."""

from .rasterize import RasterResult, rasterize

__all__ = ["rasterize", "RasterResult"]
