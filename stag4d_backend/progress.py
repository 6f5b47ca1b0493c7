"""Terminal progress for long stages (tqdm); the server uses the same stats dicts as events."""

from __future__ import annotations

import sys

from tqdm import tqdm


class FitProgressBar:
    """A tqdm bar fed by the fit's per-step stats: step, stage, loss, reference PSNR, number of Gaussians."""

    def __init__(self, total: int, file=None):
        self._bar = tqdm(total=total, unit="step", file=file or sys.stderr, dynamic_ncols=True,
                         disable=None, mininterval=0.5)

    def update(self, stats: dict) -> None:
        self._bar.n = stats["step"]
        self._bar.set_postfix(stage=stats.get("stage"), loss=f"{stats.get('loss', 0):.1f}",
                              psnr=f"{stats.get('psnr_ref', 0):.1f}", gaussians=stats.get("num_gaussians"),
                              refresh=False)
        self._bar.update(0)

    def close(self) -> None:
        self._bar.close()


class StageProgressBars:
    """One tqdm bar per pipeline stage, fed with (stage, stats) pairs; stats carry step and total."""

    def __init__(self, file=None):
        self._file = file or sys.stderr
        self._stage = None
        self._bar = None

    def update(self, stage: str, stats: dict) -> None:
        if stage != self._stage:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=stats.get("total"), desc=stage, unit="step", file=self._file,
                             dynamic_ncols=True, disable=None, mininterval=0.5)
        self._bar.n = stats.get("step", self._bar.n)
        post = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in stats.items()
                if k in ("stage", "loss", "psnr_ref", "num_gaussians")}
        self._bar.set_postfix(post, refresh=False)
        self._bar.update(0)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
