"""The training views' volume, and the checks that keep every Gaussian explained by the data. Pure math.

With a static opacity the deformation field can only make a Gaussian disappear at a frame by moving it: left
off the object's silhouette (over background) it gets almost no position gradient, and outside the image of
every training camera none at all, so it stays there as a stray splat; densification then copies it, offset
included (measured: docs/fitting.md "Stray Gaussians", docs/benchmarks.md). Two cures live here:
- the ``in_view`` loss (``TrainingViews.loss``): every deformed Gaussian inside the image of every training camera
  (the front view and the six anchor poses); zero inside, so it does not bias what the data constrains;
- the ``in_silhouette`` loss (``TrainingViews.silhouette_loss``): every deformed centre on the object's (grown)
  silhouette in every training view with a matte, at the frame being trained. The field can also hide a
  Gaussian by shrinking it to nothing and parking it off the object (the squashing ball's contact frames:
  scales 100x smaller, 2 radii above the ball); such a Gaussian draws nothing, so no photometric loss sees it,
  but its centre is still a point of the object's animated point cache. Zero on the object, so it does not bias
  what the images constrain;
- the silhouette check (``TrainingViews.off_silhouette``): in how many training views a centre is off the matte,
  used at densification events to keep strays from being copied and to prune them.
``count_out_of_view`` is the bake's reported check.

Overshoot of a point for one camera: how far it is outside the camera's viewing pyramid, sideways, in units of
the camera distance (see ``TrainingViews.overshoot``).
"""

from __future__ import annotations

import torch

from ..render.cameras import OrbitCamera, anchor_cameras


class TrainingViews:
    """World-to-camera rotations, translations and focal scales of the cameras the fit trains with."""

    def __init__(self, cameras: list[OrbitCamera], device=None, dtype=torch.float32):
        if not cameras:
            raise ValueError("at least one camera is needed")
        views = [torch.as_tensor(c.viewmat, dtype=dtype) for c in cameras]
        self.R = torch.stack([v[:3, :3] for v in views]).to(device)            # [C, 3, 3]
        self.t = torch.stack([v[:3, 3] for v in views]).to(device)             # [C, 3]
        # tan(fovy / 2) per camera: x_ndc = (x_cam / z_cam) / tan (square images).
        self.tan_half = torch.tensor([c.size / 2.0 / c.K[1, 1] for c in cameras], dtype=dtype, device=device)
        self.distance = torch.tensor([c.radius for c in cameras], dtype=dtype, device=device)

    @classmethod
    def for_fit(cls, radius: float, fovy: float, input_elevation: float = 0.0, anchor_radius: float = 0.0,
                device=None) -> "TrainingViews":
        """The front view plus the six Zero123++ v1.1 poses (what every guidance mode trains or conditions on)."""
        front = OrbitCamera(input_elevation, 0.0, radius, fovy, 64)
        return cls([front] + anchor_cameras(64, anchor_radius or radius, fovy, input_elevation), device)

    def _camera_points(self, means: torch.Tensor) -> torch.Tensor:
        """[C, N, 3] the points in each camera's coordinates (OpenCV: x right, y down, z forward)."""
        return torch.einsum("cij,nj->cni", self.R.to(means.dtype), means) + self.t.to(means.dtype)[:, None, :]

    def _ndc(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z [C, N], ndc [C, N, 2]): depth and normalised image position (-1..1 across the image)."""
        pc = self._camera_points(means)
        z = pc[..., 2]
        return z, pc[..., :2] / (z.clamp_min(1e-6)[..., None] * self.tan_half.to(means.dtype)[:, None, None])

    def overshoot(self, means: torch.Tensor) -> torch.Tensor:
        """[C, N] how far each point is outside each camera's viewing pyramid, in units of the camera distance
        (0 inside): ``(relu(|x| - z tan) + relu(|y| - z tan)) / distance`` in camera coordinates. Defined and
        pointing back inside for every point, including points behind the camera (z <= 0)."""
        pc = self._camera_points(means)
        half = pc[..., 2] * self.tan_half.to(means.dtype)[:, None]  # half the image width at that depth
        side = torch.relu(pc[..., 0].abs() - half) + torch.relu(pc[..., 1].abs() - half)
        return side / self.distance.to(means.dtype)[:, None]

    def outside_any(self, means: torch.Tensor, tolerance: float = 0.0) -> torch.Tensor:
        """[N] bool: outside the image of at least one camera (by more than ``tolerance``)."""
        with torch.no_grad():
            return (self.overshoot(means) > tolerance).any(0)

    def outside_all(self, means: torch.Tensor) -> torch.Tensor:
        """[N] bool: seen by no camera at all."""
        with torch.no_grad():
            return (self.overshoot(means) > 0).all(0)

    def loss(self, means: torch.Tensor) -> torch.Tensor:
        """Sum over Gaussians and cameras of the squared overshoot (0 when every point is inside every view)."""
        return torch.square(self.overshoot(means)).sum()


    def silhouette_loss(self, means: torch.Tensor, distance_maps: torch.Tensor) -> torch.Tensor:
        """Sum over Gaussians and cameras of the squared distance of each centre from the camera's (grown)
        silhouette, in units of the image side: 0 on the object, growing away from it. ``distance_maps``
        [C, S, S] from :func:`silhouette_distance`, in this object's camera order. Points behind a camera add
        nothing; points outside an image get the border's distance (``loss`` pulls them in)."""
        z, ndc = self._ndc(means)
        d = torch.nn.functional.grid_sample(distance_maps[:, None].to(means.dtype), ndc[:, None], mode="bilinear",
                                            padding_mode="border", align_corners=False)[:, 0, 0]   # [C, N]
        return torch.square(d * (z > 0)).sum()

    @torch.no_grad()
    def off_silhouette(self, means: torch.Tensor, masks: list[torch.Tensor], margin: float = 0.02) -> torch.Tensor:
        """[N] number of cameras in whose image the point falls outside the object's silhouette: outside the
        image, or on background farther than ``margin`` (a fraction of the image side) from the mask. ``masks``:
        one [H, W] matte per camera, in this object's camera order."""
        count = torch.zeros(means.shape[0], dtype=torch.long, device=means.device)
        z_all, ndc_all = self._ndc(means)
        for c, mask in enumerate(masks):
            size = mask.shape[-1]
            grown = dilate_mask(mask, margin)
            z, ndc = z_all[c], ndc_all[c]
            pix = ((ndc + 1.0) * 0.5 * size).floor().long()  # OpenCV camera: x right, y down
            inside = (z > 0) & (pix >= 0).all(1) & (pix < size).all(1)
            pix = pix.clamp(0, size - 1)
            on_object = grown[pix[:, 1], pix[:, 0]] > 0.5
            count += (~(inside & on_object)).long()
        return count


def dilate_mask(mask: torch.Tensor, margin: float) -> torch.Tensor:
    """The matte [H, W] grown by ``margin`` x its side (a square max filter); unchanged for margin 0."""
    radius = max(0, round(margin * mask.shape[-1]))
    if radius <= 0:
        return mask
    return torch.nn.functional.max_pool2d(mask[None, None].float(), 2 * radius + 1, 1, radius)[0, 0]


def silhouette_distance(mask: torch.Tensor, margin: float, size: int = 128) -> torch.Tensor:
    """[size, size] distance of each pixel from the matte grown by ``margin`` (both as fractions of the image
    side; 0 on the grown matte). The matte is reduced to ``size`` by max pooling, so the object never shrinks.
    All zeros for an empty matte (nothing to keep Gaussians near)."""
    import numpy as np
    from scipy.ndimage import distance_transform_edt

    grown = dilate_mask(mask.float(), margin) > 0.5
    side = grown.shape[-1]
    if side > size and side % size == 0:
        grown = torch.nn.functional.max_pool2d(grown[None, None].float(), side // size)[0, 0] > 0.5
    if not bool(grown.any()):
        return torch.zeros(grown.shape, dtype=torch.float32)
    dist = distance_transform_edt(~grown.cpu().numpy())
    return torch.from_numpy(np.asarray(dist, dtype=np.float32) / grown.shape[-1])


VISIBLE_OPACITY = 0.05


def count_out_of_view(views: TrainingViews, positions: torch.Tensor, opacities: torch.Tensor,
                      min_opacity: float = VISIBLE_OPACITY) -> dict:
    """Bake-time check (reported, nothing is moved or removed): Gaussians with opacity > ``min_opacity`` that at
    some frame of ``positions`` [T, N, 3] are outside the image of every training view. Returns ``count``,
    ``visible`` (Gaussians over the opacity) and ``frames`` (per frame, how many are out)."""
    vis = opacities.reshape(-1) > min_opacity
    per_frame = []
    out = torch.zeros_like(vis)
    for pos in positions:
        o = views.outside_all(pos) & vis
        per_frame.append(int(o.sum()))
        out |= o
    return {"count": int(out.sum()), "visible": int(vis.sum()), "frames": per_frame}


__all__ = ["TrainingViews", "count_out_of_view", "dilate_mask", "silhouette_distance", "VISIBLE_OPACITY"]
