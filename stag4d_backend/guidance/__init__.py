"""Diffusion guidance for the fit: the score-distillation interface (and, later, Zero123 / Zero123++)."""

from .base import ScoreDistillation, SDSRequest

__all__ = ["ScoreDistillation", "SDSRequest"]
