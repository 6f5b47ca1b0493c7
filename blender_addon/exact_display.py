"""The exact display: the backend's own rasteriser renders the splats for the scene camera, frame by frame, and
Blender's compositor lays that RGBA over the rest of the scene by depth (Z Combine).

Geometry-node ellipsoids ray-traced by Cycles or drawn by EEVEE approximate the rasteriser (their compositing
order is per ray, not per Gaussian; see docs/blender_addon.md). This path is the rasteriser itself:

1. ``views_for_scene`` (main thread): for each frame of the scene range, the scene camera's matrix in the splat
   object's own space (``object.matrix_world.inverted() @ camera.matrix_world``: the fit's Y-up world, with any
   move, rotation or uniform scale of the splat object) and its pinhole intrinsics (``camera_intrinsics``: lens,
   sensor fit, shift, resolution, pixel aspect), with the fit's frame value of that frame from bake.json;
2. ``ExactRender`` (a thread): ``stag4d render MODEL --views VIEWS.json -o FOLDER`` with the backend's Python
   (the same one the local server runs): ``rgba_NNNN.png`` (straight sRGB RGBA) and ``depth_NNNN.png`` (16-bit,
   camera depth in DEPTH_UNIT Blender units) per frame. Its progress lines go to the job's message; the UI
   never waits for it;
3. ``setup_compositor`` (main thread, when the images are there): per pixel the nearer of the Render Layers'
   image and the splat image goes over the other (two Alpha Over nodes, picked by a Z Combine on the depths); the splat object's own display is
   hidden from the render (it would be drawn twice). F12 and Render Animation then give the rasteriser's
   splats composited with the scene by depth. Change the camera, its lens or the resolution and run it again.

The add-on imports no torch: the rasteriser runs in the backend's own process.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import bpy

from .backend.session import post

DEPTH_UNIT = 0.001          # Blender units per step of depth_NNNN.png (stag4d_backend.export.camera_views)
DEPTH_FULL = 65535 * DEPTH_UNIT  # what a 16-bit PNG's 1.0 is, in Blender units
FOLDER = "exact"            # under the job folder: exact/<camera name>/
NODE_PREFIX = "STAG4D exact"


class ExactDisplayError(RuntimeError):
    """Why the exact display cannot be made (one line)."""


def camera_intrinsics(scene, camera) -> tuple[list[list[float]], int, int]:
    """Pinhole K (pixels, y down, principal point from the lens shift) and the render size of ``camera``, as
    Blender's own camera model computes its view plane (BKE_camera_params_compute_viewplane)."""
    cam = camera.data
    if cam.type != "PERSP":
        raise ExactDisplayError(f"the exact display needs a perspective camera ('{camera.name}' is {cam.type})")
    r = scene.render
    width = max(1, round(r.resolution_x * r.resolution_percentage / 100))
    height = max(1, round(r.resolution_y * r.resolution_percentage / 100))
    ycor = r.pixel_aspect_y / r.pixel_aspect_x
    fit = cam.sensor_fit
    sensor = cam.sensor_width
    if fit == "AUTO":
        fit = "HORIZONTAL" if r.pixel_aspect_x * width >= r.pixel_aspect_y * height else "VERTICAL"
    elif fit == "VERTICAL":
        sensor = cam.sensor_height
    viewfac = width if fit == "HORIZONTAL" else ycor * height
    fx = cam.lens * viewfac / sensor
    fy = fx / ycor
    cx = width / 2.0 - cam.shift_x * viewfac
    cy = height / 2.0 + cam.shift_y * viewfac / ycor
    return [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]], width, height


def camera_in_object(camera, splat_obj) -> list[list[float]]:
    m = splat_obj.matrix_world.inverted() @ camera.matrix_world
    return [list(row) for row in m]


def views_for_scene(scene, splat_obj, frame_values=None, camera=None) -> list[dict]:
    """One view per frame of the scene range (the camera may be animated); the scene returns to its frame."""
    camera = camera or scene.camera
    if camera is None or camera.type != "CAMERA":
        raise ExactDisplayError("the scene has no camera: add one (the exact display renders through it)")
    current = scene.frame_current
    views = []
    try:
        for f in range(scene.frame_start, scene.frame_end + 1):
            scene.frame_set(f)
            K, width, height = camera_intrinsics(scene, camera)
            if frame_values:
                value = float(frame_values[min(max(f, 0), len(frame_values) - 1)])
            else:
                value = float(f)
            views.append({"index": f, "frame": value, "camera_in_object": camera_in_object(camera, splat_obj),
                          "K": K, "width": width, "height": height})
    finally:
        scene.frame_set(current)
    return views


def model_dir(job_dir: Path) -> Path:
    """A job folder's model/ (or a fit output folder itself)."""
    return job_dir / "model" if (job_dir / "model").is_dir() else job_dir


class ExactRender(threading.Thread):
    """Runs ``stag4d render --views`` and posts its progress; never touches bpy."""

    def __init__(self, key: str, command: list[str], model: Path, views: list[dict], out_dir: Path,
                 kind: str = "exact", extra_args: tuple[str, ...] = ()):
        """``kind``: the posted updates' type ("exact"; "ray_stop" for the ray stop's maps, ray_stop.py, made
        with ``extra_args`` ("--stop-depth",))."""
        super().__init__(daemon=True, name=f"stag4d-{kind.replace('_', '-')}-{key[:8]}")
        self.key, self.command, self.model, self.views, self.out_dir = key, command, model, views, out_dir
        self.kind, self.extra_args = kind, tuple(extra_args)
        self.label = "Ray stop" if kind == "ray_stop" else "Exact display"
        self.proc: subprocess.Popen | None = None

    def run(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            views_path = self.out_dir / "views.json"
            views_path.write_text(json.dumps(self.views))
            argv = [*self.command, "render", str(self.model), "--views", str(views_path), "-o", str(self.out_dir),
                    *self.extra_args]
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            done = 0
            for line in self.proc.stdout:
                if line.startswith("view "):
                    done += 1
                    post({"type": self.kind, "key": self.key, "done": done, "total": len(self.views)})
            err = self.proc.stderr.read().strip()
            rc = self.proc.wait()
            if rc != 0:
                last = err.splitlines()[-1] if err else f"exit status {rc}"
                post({"type": self.kind, "key": self.key,
                      "error": f"{self.label}: the backend's render failed: {last}"})
                return
            post({"type": self.kind, "key": self.key, "done": len(self.views), "total": len(self.views),
                  "folder": str(self.out_dir), "first": min((v["index"] for v in self.views), default=0)})
        except Exception as exc:  # noqa: BLE001 - reported on the job, never raised on a thread
            post({"type": self.kind, "key": self.key, "error": f"{self.label}: {type(exc).__name__}: {exc}"})


# ---- the compositor ---------------------------------------------------------------------------------------------

def _compositor_tree(scene):
    """The scene's compositing node tree (Blender 5.0: a node group; 4.2/4.5: scene.node_tree with use_nodes)."""
    if hasattr(scene, "compositing_node_group"):
        tree = scene.compositing_node_group
        if tree is None:
            tree = bpy.data.node_groups.new(f"{NODE_PREFIX} compositing", "CompositorNodeTree")
            scene.compositing_node_group = tree
        return tree
    scene.use_nodes = True
    return scene.node_tree


def _output(tree):
    """The tree's output node (Group Output in 5.0, Composite before), created if absent."""
    if hasattr(bpy.types, "CompositorNodeComposite"):
        node = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeComposite"), None)
        if node is None:
            node = tree.nodes.new("CompositorNodeComposite")
        return node, node.inputs["Image"]
    node = next((n for n in tree.nodes if n.bl_idname == "NodeGroupOutput"), None)
    if node is None:
        node = tree.nodes.new("NodeGroupOutput")
    if not any(getattr(i, "in_out", "") == "OUTPUT" for i in tree.interface.items_tree):
        tree.interface.new_socket("Image", in_out="OUTPUT", socket_type="NodeSocketColor")
    return node, node.inputs[0]


def image_sequence(folder: Path, prefix: str, first: int, count: int, colorspace: str):
    """``folder``'s <prefix>_NNNN.png from frame ``first`` on as one image sequence (replacing an earlier load)."""
    path = folder / f"{prefix}_{first:04d}.png"
    name = f"{NODE_PREFIX} {folder.name} {prefix}"
    img = bpy.data.images.get(name)
    if img is not None:
        bpy.data.images.remove(img)
    img = bpy.data.images.load(str(path), check_existing=False)
    img.name = name
    img.source = "SEQUENCE"
    img.colorspace_settings.name = colorspace
    return img


def _image_node(tree, img, first: int, count: int, x: int, y: int):
    node = tree.nodes.new("CompositorNodeImage")
    node.image = img
    node.frame_start, node.frame_offset, node.frame_duration = first, first - 1, count
    node.location = (x, y)
    node.name = node.label = f"{NODE_PREFIX} {img.name.rsplit(' ', 1)[-1]}"
    return node


def _multiply(tree, value, factor: float, x: int, y: int):
    node = tree.nodes.new("CompositorNodeMath" if hasattr(bpy.types, "CompositorNodeMath") else "ShaderNodeMath")
    node.operation = "MULTIPLY"
    node.location = (x, y)
    node.name = node.label = f"{NODE_PREFIX} depth"
    tree.links.new(value, node.inputs[0])
    node.inputs[1].default_value = factor
    return node.outputs[0]


def setup_compositor(scene, folder: Path, first: int, count: int, splat_obj=None) -> None:
    """Render Layers (image, depth) Z-combined with the backend's RGBA + depth sequences, into the output."""
    tree = _compositor_tree(scene)
    for node in [n for n in tree.nodes if n.name.startswith(NODE_PREFIX)]:
        tree.nodes.remove(node)
    layers = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers"), None)
    if layers is None:
        layers = tree.nodes.new("CompositorNodeRLayers")
        layers.location = (-600, 300)
    for layer in scene.view_layers:
        layer.use_pass_z = True
    rgba = _image_node(tree, image_sequence(folder, "rgba", first, count, "sRGB"), first, count, -600, -100)
    depth = _image_node(tree, image_sequence(folder, "depth", first, count, "Non-Color"), first, count, -600, -400)
    links = tree.links
    scene_img, scene_z = layers.outputs["Image"], layers.outputs["Depth"]
    splat_img = rgba.outputs["Image"]
    splat_z = _multiply(tree, depth.outputs["Image"], DEPTH_FULL, -300, -400)
    # Per pixel, whichever is nearer goes over the other (premultiplied "over"): Z Combine picks between the
    # two orders by depth, without its own alpha mix (that one multiplies a premultiplied image by alpha again).
    splats_over = _alpha_over(tree, background=scene_img, foreground=splat_img, x=-100, y=150)
    scene_over = _alpha_over(tree, background=splat_img, foreground=scene_img, x=-100, y=-150)
    zc = tree.nodes.new("CompositorNodeZcombine")
    zc.name = zc.label = f"{NODE_PREFIX} z combine"
    zc.location = (150, 0)
    _zcombine_plain(zc)
    links.new(scene_over, zc.inputs[0])
    links.new(scene_z, zc.inputs[1])
    links.new(splats_over, zc.inputs[2])
    links.new(splat_z, zc.inputs[3])
    _, out_socket = _output(tree)
    links.new(zc.outputs[0], out_socket)
    scene.render.use_compositing = True
    # The images are sRGB and decoded to linear on load: the scene's own view transform (Standard) encodes them
    # back exactly, and the rest of the scene is shown right. The Raw transform of the display-space blending
    # would show them darker; that blending only matters for the ellipsoids, which the render now hides.
    if getattr(scene.stag4d, "backend_look", False):
        scene.stag4d.backend_look = False
    if splat_obj is not None:
        splat_obj.hide_render = True  # the rasteriser draws them; the ellipsoids would be a second copy
    scene["stag4d_exact_folder"] = str(folder)


def _alpha_over(tree, background, foreground, x: int, y: int):
    """Premultiplied ``foreground`` over ``background`` (Blender 5.0 names its inputs, 4.2/4.5 number them)."""
    node = tree.nodes.new("CompositorNodeAlphaOver")
    node.name = node.label = f"{NODE_PREFIX} over {x} {y}"
    node.location = (x, y)
    if "Background" in node.inputs:
        bg, fg = node.inputs["Background"], node.inputs["Foreground"]
    else:
        bg, fg = node.inputs[1], node.inputs[2]
    tree.links.new(background, bg)
    tree.links.new(foreground, fg)
    return node.outputs[0]


def _zcombine_plain(node) -> None:
    """Pick the nearer pixel whole (no alpha mix, no anti-aliased mask): 5.0 input sockets, 4.x properties."""
    for socket, prop in (("Use Alpha", "use_alpha"), ("Anti-Alias", "use_antialias_z")):
        if socket in node.inputs:
            node.inputs[socket].default_value = False
        else:
            setattr(node, prop, False)


def remove_compositor(scene, splat_obj=None) -> None:
    """Back to the splat object's own display: the exact nodes removed, the splats rendered again."""
    tree = scene.compositing_node_group if hasattr(scene, "compositing_node_group") else scene.node_tree
    if tree is not None:
        for node in [n for n in tree.nodes if n.name.startswith(NODE_PREFIX)]:
            tree.nodes.remove(node)
        layers = next((n for n in tree.nodes if n.bl_idname == "CompositorNodeRLayers"), None)
        out = next((n for n in tree.nodes if n.bl_idname in ("CompositorNodeComposite", "NodeGroupOutput")), None)
        if layers is not None and out is not None and out.inputs and not out.inputs[0].is_linked:
            tree.links.new(layers.outputs["Image"], out.inputs[0])
    if splat_obj is not None:
        splat_obj.hide_render = False
    scene.pop("stag4d_exact_folder", None)
