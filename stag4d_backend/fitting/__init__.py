"""The 4D fit: view sampling, losses, the training step, checkpoints (the stage lives in stages/fit.py)."""
