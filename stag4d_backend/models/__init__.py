"""Model registry and loaders: the only place that loads diffusion weights (docs/models.md)."""
