"""Export a job's collection: USD (the animated Gaussians, and the mesh if imported) and Alembic (the mesh); and
the job's baked splat sequences (glTF KHR_gaussian_splatting .glb, Niantic .spz per frame), copied as baked: these
carry every Gaussian attribute (SH included) at full precision, which the imported point cloud does not.

USD: Blender's exporter on the collection's objects with the "Gaussian splats" modifier switched off for the
duration, so the file holds the animated points with their primvars (displayColor, opacity, scales,
orientations, widths), not 50k ico-sphere instances. Alembic skips point clouds entirely, so it is for the mesh.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import bpy

from . import splat_nodes


class ExportError(RuntimeError):
    pass


@contextmanager
def _only_selected(scene, objects):
    view_layer = scene.view_layers[0]
    for w in (bpy.context.window_manager.windows if bpy.context.window_manager else []):
        if w.scene == scene:
            view_layer = w.view_layer
    before = [o for o in view_layer.objects if o.select_get(view_layer=view_layer)]
    active = view_layer.objects.active
    for o in before:
        o.select_set(False, view_layer=view_layer)
    for o in objects:
        o.select_set(True, view_layer=view_layer)
    if objects:
        view_layer.objects.active = objects[0]
    try:
        yield view_layer
    finally:
        for o in objects:
            if o.name in bpy.data.objects:
                o.select_set(False, view_layer=view_layer)
        for o in before:
            if o.name in bpy.data.objects:
                o.select_set(True, view_layer=view_layer)
        view_layer.objects.active = active


@contextmanager
def _splats_off(objects):
    mods = [m for o in objects for m in o.modifiers
            if m.type == "NODES" and m.node_group is not None and m.node_group.name.startswith(splat_nodes.GROUP_NAME)]
    saved = [(m, m.show_viewport, m.show_render) for m in mods]
    for m in mods:
        m.show_viewport = m.show_render = False
    try:
        yield
    finally:
        for m, v, r in saved:
            m.show_viewport, m.show_render = v, r


def _objects(collection):
    objs = [o for o in collection.all_objects if o.type in ("POINTCLOUD", "MESH")]
    if not objs:
        raise ExportError(f"collection {collection.name!r} has nothing to export")
    return objs


def export_usd(collection, filepath: str | Path, scene=None) -> Path:
    scene = scene or bpy.context.scene
    filepath = Path(bpy.path.abspath(str(filepath)))
    filepath.parent.mkdir(parents=True, exist_ok=True)
    objs = _objects(collection)
    with _splats_off(objs), _only_selected(scene, objs) as view_layer:
        with bpy.context.temp_override(scene=scene, view_layer=view_layer):
            result = bpy.ops.wm.usd_export(filepath=str(filepath), selected_objects_only=True,
                                           export_animation=True, export_materials=False)
    if result != {"FINISHED"} or not filepath.is_file():
        raise ExportError(f"USD export to {filepath} failed")
    return filepath


def export_alembic(collection, filepath: str | Path, scene=None) -> Path:
    scene = scene or bpy.context.scene
    filepath = Path(bpy.path.abspath(str(filepath)))
    filepath.parent.mkdir(parents=True, exist_ok=True)
    meshes = [o for o in collection.all_objects if o.type == "MESH"]
    if not meshes:
        raise ExportError("no mesh in this job's collection: tick 'Import Mesh' and import the job again "
                          "(Alembic cannot hold point clouds)")
    with _only_selected(scene, meshes) as view_layer:
        with bpy.context.temp_override(scene=scene, view_layer=view_layer):
            result = bpy.ops.wm.alembic_export(filepath=str(filepath), selected=True, start=scene.frame_start,
                                               end=scene.frame_end, vcolors=True, as_background_job=False)
    if result != {"FINISHED"} or not filepath.is_file():
        raise ExportError(f"Alembic export to {filepath} failed")
    return filepath


SEQUENCES = {"gltf": ("gltf", ".glb", ("canonical.glb",)), "spz": ("spz", ".spz", ())}


def export_sequence(job_dir: str | Path, fmt: str, target_dir: str | Path) -> list[Path]:
    """Copy ``job_dir/bake/<fmt>/*`` (and glTF's canonical.glb) into ``target_dir``; returns the files written."""
    if fmt not in SEQUENCES:
        raise ExportError(f"unknown sequence format {fmt!r}")
    folder, ext, extras = SEQUENCES[fmt]
    bake = Path(bpy.path.abspath(str(job_dir))).expanduser() / "bake"
    frames = sorted((bake / folder).glob(f"*{ext}")) if (bake / folder).is_dir() else []
    if not frames:
        raise ExportError(f"this job was baked without {fmt}: tick '{'glTF Splats' if fmt == 'gltf' else 'SPZ'}' "
                          f"under 'Also bake' and generate again, or run `stag4d bake JOB --formats {fmt}` "
                          f"on the job folder")
    if not str(target_dir):
        raise ExportError("choose a folder to export to")
    target = Path(bpy.path.abspath(str(target_dir))).expanduser()
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for src in frames + [bake / name for name in extras if (bake / name).is_file()]:
        written.append(Path(shutil.copy2(src, target / src.name)))
    return written


__all__ = ["export_usd", "export_alembic", "export_sequence", "ExportError"]
