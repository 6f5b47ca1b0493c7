"""Bring a job's baked result into the scene (main thread only).

``bake/gaussians.usdc`` goes through Blender's own USD importer: one POINTCLOUD object whose Mesh Sequence Cache
modifier animates positions and the ``scales``/``orientations`` attributes over the timeline (docs/bake.md).
On top of it: the "Gaussian splats" geometry-nodes modifier (splat_nodes.py), the scene's frame range and fps from
``bake/bake.json``, and, as an option, the animated mesh ``bake/mesh.usdc``. A live preview reuses the same
object: a new snapshot only repoints its cache file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import bpy

from . import compat, splat_nodes

ROLE = "stag4d_role"
JOB = "stag4d_job"
MESH_MATERIAL = "STAG4D mesh"
CYCLES_TRANSPARENT_BOUNCES = 1024  # Blender's most; 8 (default) or 128 turn dense splats dark where rays run out
# "Converging" splat sampling: Russian roulette from the 64th transparent bounce on. A ray that has crossed 64
# splats has mostly little light left to gather; ending it at random (and weighting the survivors) makes a
# sample 8-11x cheaper on dense fits, at the price of noise that the samples average away (docs/blender_addon.md).
CONVERGING_MIN_TRANSPARENT_BOUNCES = 64
SPLAT_SAMPLING = (
    ("EXACT", "Exact per Sample",
     "Every ray composites every splat it crosses (no Russian roulette on transparent bounces): each sample is "
     "the exact splat image, so 1 sample is final; costly per sample on dense fits"),
    ("CONVERGING", "Converging",
     f"Russian roulette on transparent bounces after the {CONVERGING_MIN_TRANSPARENT_BOUNCES}th: samples 8-11x "
     "cheaper, noisy at few samples, converging at many (64 or more; with adaptive sampling's Min Samples set to "
     "4 or so, converged pixels stop early). For scenes rendered at many samples"),
)


class ImportError_(RuntimeError):
    """A job folder that cannot be imported (one line: what is missing and what to do)."""


@dataclass
class ImportResult:
    collection: bpy.types.Collection
    gaussians: bpy.types.Object
    mesh: bpy.types.Object | None = None
    fps: float | None = None
    frames: int | None = None
    timings: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


def resolve_job_dir(directory: str | Path) -> Path:
    """A job folder, its ``bake`` folder, or the ``gaussians.usdc`` file itself -> the folder holding ``bake/``."""
    p = Path(bpy.path.abspath(str(directory))).expanduser()
    if p.is_file() and p.suffix == ".usdc":
        p = p.parent
    if (p / "gaussians.usdc").is_file() and p.name == "bake":
        return p.parent
    if (p / "gaussians.usdc").is_file():
        return p  # a bare bake folder with another name: treat it as the bake folder's parent-less form
    if (p / "bake" / "gaussians.usdc").is_file():
        return p
    raise ImportError_(f"{p}: no bake/gaussians.usdc here; pick a finished job folder (one with a bake/ folder)")


def _bake_dir(job_dir: Path) -> Path:
    return job_dir if (job_dir / "gaussians.usdc").is_file() else job_dir / "bake"


def read_manifest(bake_dir: Path) -> dict:
    try:
        return json.loads((bake_dir / "bake.json").read_text())
    except (OSError, ValueError):
        return {}


def _label(job_dir: Path) -> str:
    try:
        job = json.loads((job_dir / "job.json").read_text())
        req = job.get("request") or {}
        kind = job.get("kind") or req.get("kind")
        if req.get("prompt"):
            return str(req["prompt"])[:40]
        if req.get("path"):
            return Path(str(req["path"])).stem[:40]
        if kind:
            return f"{kind} {job.get('id', job_dir.name)}"
    except (OSError, ValueError, AttributeError):
        pass
    return job_dir.name


def _new_collection(scene, name: str) -> bpy.types.Collection:
    coll = bpy.data.collections.new(name)
    scene.collection.children.link(coll)
    return coll


def _layer_collection(layer_coll, coll):
    if layer_coll.collection == coll:
        return layer_coll
    for child in layer_coll.children:
        found = _layer_collection(child, coll)
        if found is not None:
            return found
    return None


def _context_override(scene):
    """Operators (the USD importer) run for ``scene`` even when called from a timer or another scene."""
    wm = bpy.context.window_manager
    window = next((w for w in wm.windows if w.scene == scene), None) if wm else None
    kwargs = {"scene": scene}
    if window is not None:
        kwargs.update(window=window, screen=window.screen)
    view_layer = window.view_layer if window is not None else scene.view_layers[0]
    kwargs["view_layer"] = view_layer
    return bpy.context.temp_override(**kwargs), view_layer


def usd_import(path: Path, scene, collection, set_frame_range: bool = False) -> list[bpy.types.Object]:
    """Blender's USD importer into ``collection``; returns the new objects."""
    before = set(bpy.data.objects)
    override, view_layer = _context_override(scene)
    with override:
        layer = _layer_collection(view_layer.layer_collection, collection)
        previous = view_layer.active_layer_collection
        if layer is not None:
            view_layer.active_layer_collection = layer
        try:
            result = bpy.ops.wm.usd_import(filepath=str(path), set_frame_range=set_frame_range,
                                           import_usd_preview=False, import_materials=False)
        finally:
            if layer is not None:
                view_layer.active_layer_collection = previous
    if result != {"FINISHED"}:
        raise ImportError_(f"Blender's USD importer could not read {path}")
    new = [o for o in bpy.data.objects if o not in before]
    for obj in new:  # the importer links to the active collection; make sure they are only in ours
        if obj.name not in collection.objects:
            collection.objects.link(obj)
        for c in list(obj.users_collection):
            if c != collection:
                c.objects.unlink(obj)
    return new


def set_frame_range_and_fps(scene, frames: int | None, fps: float | None) -> None:
    """Frame k shows time code k (docs/bake.md), so the range is 0 .. T-1; the fps is the job's."""
    if frames:
        scene.frame_start, scene.frame_end = 0, int(frames) - 1
        if not scene.frame_start <= scene.frame_current <= scene.frame_end:
            scene.frame_set(0)
    if fps and fps > 0:
        whole = max(1, round(fps))
        scene.render.fps, scene.render.fps_base = whole, whole / float(fps)


def configure_render(scene, standard_colors: bool = True, backend_look: bool = False) -> None:
    """Cycles: enough transparent bounces for every splat a ray crosses (each is two surfaces; where they run
    out the ray stops and the pixel goes dark) and no Russian roulette on them (it ends rays at random: grain).
    Colours: the Standard view transform, and with ``backend_look`` the rasteriser's sRGB-value blending."""
    if hasattr(scene, "cycles"):
        cyc = scene.cycles
        cyc.transparent_max_bounces = max(cyc.transparent_max_bounces, CYCLES_TRANSPARENT_BOUNCES)
        set_splat_sampling(scene, scene.stag4d.splat_sampling)
    if standard_colors:
        try:
            scene.view_settings.view_transform = "Standard"
        except TypeError:  # an OCIO config without "Standard": leave it
            pass
    if backend_look:
        scene.stag4d.backend_look = True  # its update switches the material and the view transform


def set_splat_sampling(scene, mode: str) -> None:
    """Cycles' Russian roulette on transparent bounces for ``mode`` (SPLAT_SAMPLING): none for EXACT (the minimum
    transparent bounces = the maximum), from the 64th bounce for CONVERGING."""
    if not hasattr(scene, "cycles"):
        return
    cyc = scene.cycles
    cyc.min_transparent_bounces = (cyc.transparent_max_bounces if mode == "EXACT"
                                   else min(CONVERGING_MIN_TRANSPARENT_BOUNCES, cyc.transparent_max_bounces))


def _mesh_material() -> bpy.types.Material:
    mat = bpy.data.materials.get(MESH_MATERIAL)
    if mat is not None:
        return mat
    mat = bpy.data.materials.new(MESH_MATERIAL)
    nt = compat.material_node_tree(mat)
    nodes, links = nt.nodes, nt.links
    bsdf = next(n for n in nodes if n.type == "BSDF_PRINCIPLED")
    attr = nodes.new("ShaderNodeAttribute")
    attr.attribute_name = "displayColor"  # the mesh's vertex colours (linear)
    attr.location = (-300, 200)
    links.new(attr.outputs["Color"], bsdf.inputs["Base Color"])
    bsdf.inputs["Roughness"].default_value = 0.8
    return mat


def setup_gaussians(obj, scene, job_key: str = "", points: bool = False) -> None:
    obj[ROLE] = "gaussians"
    if job_key:
        obj[JOB] = job_key
    splat_nodes.add_splat_modifier(obj, points=points)
    splat_nodes.drive_pixel_angle(obj, scene)


def import_job(directory: str | Path, scene=None, *, name: str | None = None, mesh: bool = False,
               points: bool = False, job_key: str = "", set_scene: bool = True, standard_colors: bool = True,
               backend_look: bool = False, collection=None, gaussians=None) -> ImportResult:
    """Import a finished job folder. ``gaussians``: an existing splat object (e.g. the live preview) to repoint
    at the final cache instead of importing a second copy."""
    scene = scene or bpy.context.scene
    t0 = time.perf_counter()
    job_dir = resolve_job_dir(directory)
    bake_dir = _bake_dir(job_dir)
    manifest = read_manifest(bake_dir)
    label = name or _label(job_dir)
    if collection is None or collection.name not in bpy.data.collections:
        collection = _new_collection(scene, f"STAG4D {label}")
    notes = []
    if not manifest:
        notes.append("no bake.json: frame range from the USD file, fps left as is")
    timings = {}

    usd = bake_dir / "gaussians.usdc"
    t = time.perf_counter()
    if gaussians is not None and gaussians.name in bpy.data.objects:
        replace_cache(gaussians, usd)
    else:
        # Without bake.json the file's own time codes are the best frame range there is.
        new = usd_import(usd, scene, collection, set_frame_range=set_scene and not manifest)
        gaussians = next((o for o in new if o.type == "POINTCLOUD"), None)
        if gaussians is None:
            raise ImportError_(f"{usd}: no point cloud in it (not a STAG4D bake?)")
        gaussians.name = f"{label} splats"
        setup_gaussians(gaussians, scene, job_key, points)
    timings["gaussians"] = time.perf_counter() - t

    mesh_obj = None
    if mesh:
        mesh_path = bake_dir / "mesh.usdc"
        if mesh_path.is_file():
            t = time.perf_counter()
            new = usd_import(mesh_path, scene, collection)
            mesh_obj = next((o for o in new if o.type == "MESH"), None)
            if mesh_obj is not None:
                mesh_obj.name = f"{label} mesh"
                mesh_obj[ROLE] = "mesh"
                if job_key:
                    mesh_obj[JOB] = job_key
                mesh_obj.data.materials.clear()
                mesh_obj.data.materials.append(_mesh_material())
            timings["mesh"] = time.perf_counter() - t
        else:
            notes.append("this job has no mesh.usdc (bake it with --formats mesh)")

    frames = manifest.get("num_frames")
    fps = manifest.get("fps")
    if set_scene:
        set_frame_range_and_fps(scene, frames, fps)
        configure_render(scene, standard_colors, backend_look)
    collection["stag4d_dir"] = str(job_dir)
    timings["total"] = time.perf_counter() - t0
    return ImportResult(collection, gaussians, mesh_obj, fps, frames, timings, notes)


def replace_cache(obj, usd_path: str | Path) -> None:
    """Point ``obj``'s Mesh Sequence Cache at another USD file of the same layout (a newer live preview or the
    final bake); geometry nodes, materials and the user's transforms stay."""
    mod = next((m for m in obj.modifiers if m.type == "MESH_SEQUENCE_CACHE"), None)
    if mod is None or mod.cache_file is None:
        raise ImportError_(f"{obj.name} has no Mesh Sequence Cache modifier to update")
    cf = mod.cache_file
    if cf.users > 1:  # never retarget a cache file another object shares
        cf = cf.copy()
        mod.cache_file = cf
    cf.filepath = str(usd_path)
    cf.name = Path(usd_path).name
    obj.update_tag()


def show_preview(scene, usd_path: str | Path, *, label: str, job_key: str, collection=None, gaussians=None,
                 frames: int | None = None, points: bool = False):
    """Show (or update) a live-preview snapshot; returns (collection, object)."""
    usd_path = Path(usd_path)
    if collection is None or collection.name not in bpy.data.collections:
        collection = _new_collection(scene, f"STAG4D {label}")
    if gaussians is not None and gaussians.name in bpy.data.objects:
        replace_cache(gaussians, usd_path)
    else:
        new = usd_import(usd_path, scene, collection)
        gaussians = next((o for o in new if o.type == "POINTCLOUD"), None)
        if gaussians is None:
            raise ImportError_(f"{usd_path}: no point cloud in the preview snapshot")
        gaussians.name = f"{label} splats"
        setup_gaussians(gaussians, scene, job_key, points)
    gaussians["stag4d_preview"] = str(usd_path)
    if frames:
        set_frame_range_and_fps(scene, frames, None)
    return collection, gaussians


__all__ = ["import_job", "show_preview", "replace_cache", "resolve_job_dir", "set_frame_range_and_fps",
           "configure_render", "set_splat_sampling", "ImportResult", "ImportError_"]
