"""The floaters figure and mask IoU of benchmarks/quality.py (stag4d_backend/metrics.py), on hand-made values."""

import numpy as np
import pytest

from stag4d_backend.metrics import floater_fraction, floater_mask, mask_iou


def _scene():
    # 3 frames; the object's centre moves along x, radius 1 then 2 then 1.
    centres = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    radii = np.array([1.0, 2.0, 1.0])
    means = np.zeros((3, 5, 3))
    means[:, :, 0] = centres[:, :1]                     # every Gaussian follows the centre ...
    means[1, 1] = [1.0 + 3.3, 0.0, 0.0]                 # ... except #1: 3.3 > 1.7 x 2 is false at frame 1
    means[2, 2] = [2.0, 0.0, 1.71]                      # #2: 1.71 > 1.7 x 1 at the last frame only -> floater
    means[0, 3] = [0.0, -5.0, 0.0]                      # #3: far at frame 0 but invisible -> not counted
    means[:, 4] = centres + [0.0, 1.69, 0.0]            # #4: just inside at every frame
    opac = np.array([0.9, 0.5, 0.06, 0.04, 1.0])
    return means, opac, centres, radii


def test_floaters_count_a_gaussian_far_at_any_frame_among_visible_ones():
    means, opac, centres, radii = _scene()
    assert floater_mask(means, opac, centres, radii).tolist() == [False, False, True, False, False]
    assert floater_fraction(means, opac, centres, radii) == pytest.approx(1 / 4)  # 4 visible (opacity > 0.05)
    means[1, 1, 0] = 1.0 + 3.41                                                   # now beyond 3.4 at frame 1
    assert floater_fraction(means, opac, centres, radii) == pytest.approx(2 / 4)
    assert floater_fraction(means, opac, centres, radii, factor=4.0) == 0.0


def test_floaters_of_an_invisible_set_and_shape_errors():
    means, _, centres, radii = _scene()
    assert floater_fraction(means, np.zeros(5), centres, radii) == 0.0
    with pytest.raises(ValueError, match="need"):
        floater_fraction(means[:2], np.ones(5), centres, radii)


def test_mask_iou_on_values():
    a = np.zeros((4, 4))
    b = np.zeros((4, 4))
    a[:2, :] = 1.0                  # 8 pixels
    b[1:3, :] = 0.8                 # 8 pixels, 4 shared
    assert mask_iou(a, b) == pytest.approx(4 / 12)
    assert mask_iou(a, b, threshold=0.9) == 0.0
    assert mask_iou(a, a) == 1.0
    assert mask_iou(np.zeros(3), np.zeros(3)) == 1.0
