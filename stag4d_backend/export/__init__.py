"""Exporters of a fitted 4D model (used by the bake stage, ``stages/bake.py``). One module, one job:

- ``frames``        batched evaluation of the deformation at many frames (``sample_frames``, ``deform_points``)
- ``ply_sequence``  ``ply/{k:04d}.ply``, per-frame 3DGS PLY files
- ``gltf_splats``   ``gltf/{k:04d}.glb`` + ``canonical.glb``, glTF with KHR_gaussian_splatting (pygltflib)
- ``spz``           ``spz/{k:04d}.spz``, Niantic SPZ version 4 (numpy + zstandard, as the reference packer)
- ``usd_points``    ``gaussians.usdc``: UsdGeomPoints + UsdVol ParticleField3DGaussianSplat, time-sampled
- ``mesh_extract``  closed surface of the canonical Gaussians (density grid, marching cubes, vertex colours)
- ``usd_mesh``      ``mesh.usdc``: animated fixed-topology UsdGeomMesh
- ``cameras_json``  ``cameras.json``: input view and anchors with Blender camera matrices
- ``turntable``     `stag4d render`: images from cameras in a JSON file, ``preview.mp4`` turntable video
- ``live_preview``  a light USD snapshot of the Gaussians being fitted (the fit stage's live previews)

Only ``ply_sequence``, ``gltf_splats``, ``spz``, ``usd_*`` and ``cameras_json`` write files (atomically, via ``_atomic``).
"""

from .frames import SampledFrames, deform_points, sample_frames, srgb_to_linear

__all__ = ["SampledFrames", "sample_frames", "deform_points", "srgb_to_linear"]
