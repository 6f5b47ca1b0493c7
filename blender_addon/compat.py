"""What differs between the Blender releases the add-on supports (4.2 LTS, 4.5 LTS, 5.0), in one place.

Everything else in the add-on uses API that all of them share. The node graphs themselves use only nodes and
operations that exist in 4.2 (e.g. no Vector Math "POWER", added in 4.5), so they compute the same thing on every
release; tests/test_blender_versions.py checks that on each (docs/blender_addon.md lists the differences).
"""

from __future__ import annotations

import bpy



def material_node_tree(mat) -> bpy.types.NodeTree:
    """``mat``'s shader node tree. 5.0 gives every material one; before 5.0 a new material has none until
    ``use_nodes`` is set (deprecated in 5.0, so it is only touched where needed)."""
    if mat.node_tree is None:
        mat.use_nodes = True
    return mat.node_tree


def set_transparency(mat) -> None:
    """Settings for materials whose alpha varies per shaded point (the splats).

    EEVEE Next (4.2+): "Dithered" composites any number of overlapping splats in any order and converges with
    samples; "Blended" sorts per object only, so the instances of one cloud would overlap wrongly. Both
    attributes exist in 4.2-5.0; the checks keep the add-on importable in a build without EEVEE."""
    if hasattr(mat, "surface_render_method"):
        mat.surface_render_method = "DITHERED"
    if hasattr(mat, "use_transparent_shadow"):
        mat.use_transparent_shadow = True


__all__ = ["material_node_tree", "set_transparency"]
