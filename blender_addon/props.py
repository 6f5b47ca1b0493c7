"""What the add-on stores in the .blend: the panel's inputs and this file's jobs (Scene.stag4d)."""

from __future__ import annotations

import bpy
from bpy.props import (BoolProperty, CollectionProperty, EnumProperty, FloatProperty, IntProperty,
                       PointerProperty, StringProperty)

from .importer import SPLAT_SAMPLING, set_splat_sampling
from .preferences import PRESETS

INPUT_KINDS = [
    ("VIDEO", "Video File", "A video of one object (mp4, mov, ...)", "FILE_MOVIE", 0),
    ("IMAGE", "Image File", "One picture of an object; a video is generated from it first", "FILE_IMAGE", 1),
    ("CLIP", "Movie Clip", "A Movie Clip already in this .blend", "TRACKER", 2),
    ("BLEND_IMAGE", "Image", "An Image already in this .blend", "IMAGE_DATA", 3),
    ("PROMPT", "Text Prompt", "Describe the object; an image and a video are generated first", "FONT_DATA", 4),
    ("EXAMPLE", "Example", "The bundled procedural creature: needs no model weights", "MONKEY", 5),
]
ACTIVE_STATES = ("submitting", "queued", "running")


class STAG4D_JobItem(bpy.types.PropertyGroup):
    # ``name`` (inherited) is the label shown in the list.
    key: StringProperty(description="The add-on's id of this entry")
    job_id: StringProperty(name="Job", description="The server's job id")
    kind: StringProperty()
    backend: StringProperty(description="LOCAL or REMOTE at submission")
    server_url: StringProperty()
    state: StringProperty(default="submitting")
    stage: StringProperty()
    step: IntProperty()
    total: IntProperty()
    loss: FloatProperty(default=-1.0)
    elapsed: FloatProperty(default=-1.0)
    eta: FloatProperty(default=-1.0)
    error: StringProperty()
    message: StringProperty()
    directory: StringProperty(subtype="DIR_PATH")
    licences: StringProperty(description="One licence notice per line")
    last_event: IntProperty(default=-1)
    previews: IntProperty()
    created: FloatProperty()
    import_mesh: BoolProperty()
    imported: BoolProperty()
    collection: PointerProperty(type=bpy.types.Collection)
    gaussians: PointerProperty(type=bpy.types.Object)
    mesh: PointerProperty(type=bpy.types.Object)


def _backend_look_update(self, context):
    from . import splat_nodes

    splat_nodes.set_display_space_blending(self.id_data, self.backend_look)


def _splat_sampling_update(self, context):
    set_splat_sampling(self.id_data, self.splat_sampling)


class STAG4D_SceneSettings(bpy.types.PropertyGroup):
    input_kind: EnumProperty(name="Input", items=INPUT_KINDS, default="VIDEO")
    video_path: StringProperty(name="Video", subtype="FILE_PATH")
    image_path: StringProperty(name="Image", subtype="FILE_PATH")
    clip: PointerProperty(name="Movie Clip", type=bpy.types.MovieClip)
    image: PointerProperty(name="Image", type=bpy.types.Image)
    prompt: StringProperty(name="Prompt", description="What to generate, e.g. 'a cartoon penguin waving'")
    max_frames: IntProperty(name="Frames", default=0, min=0, soft_max=64,
                            description="Most frames to keep from the input (0: all)")
    stride: IntProperty(name="Stride", default=1, min=1, soft_max=8, description="Keep every n-th input frame")
    preset: EnumProperty(name="Preset", items=[("DEFAULT", "Default", "The preset set in the preferences")]
                         + PRESETS, default="DEFAULT")
    seed: IntProperty(name="Seed", default=0, min=0)
    iters: IntProperty(name="Iterations", default=0, min=0, description="Fitting steps (0: the preset's)")
    preview_every: IntProperty(name="Preview Every", default=0, min=0,
                               description="Fitting steps between live previews (0: the preset's checkpoint "
                                           "interval; previews are off when Live Preview is off in the preferences)")
    example_frames: IntProperty(name="Frames", default=16, min=2, max=64)
    example_size: IntProperty(name="Size", default=256, min=32, max=512)
    example_gaussians: IntProperty(name="Gaussians", default=12000, min=100, max=200000)
    import_mesh: BoolProperty(name="Import Mesh", default=False,
                              description="Also import the animated mesh (mesh.usdc) beside the splats")
    bake_gltf: BoolProperty(name="glTF Splats", default=False,
                            description="Also bake a .glb per frame (glTF KHR_gaussian_splatting) for the "
                                        "glTF export")
    bake_spz: BoolProperty(name="SPZ", default=False,
                           description="Also bake an .spz per frame (Niantic SPZ, for web viewers) for the SPZ export")
    backend_look: BoolProperty(
        name="Match the Backend Render", default=False, update=_backend_look_update,
        description="Render the splats as the backend's rasteriser does: blended in sRGB values (sRGB "
                    "emission, Raw view transform) and sampled at pixel centres (Cycles pixel filter 0.01 px: "
                    "deterministic, 1 sample is enough). Off: linear-light blending, the scene's own view "
                    "transform and pixel filter")
    splat_sampling: EnumProperty(
        name="Splat Sampling", items=SPLAT_SAMPLING, default="EXACT", update=_splat_sampling_update,
        description="How Cycles samples the splats' transparency (Render > Light Paths > Transparent: the minimum "
                    "bounces before Russian roulette)")
    ray_stop_transmittance: FloatProperty(
        name="Stop At", default=1.0 / 510.0, min=1e-4, max=0.05, precision=5,
        description="Ray Stop: a pixel's ray ends once what still shows through is this fraction or less. "
                    "0.00196 (half an 8-bit step, the default): every pixel within half an 8-bit step of the full "
                    "composite. 0.0001: the backend rasteriser's own stop, exact in float too but slower. Takes "
                    "effect when the maps are made")
    jobs: CollectionProperty(type=STAG4D_JobItem)
    active_job: IntProperty(name="Job", default=0, min=0)
    status: StringProperty(description="Backend status line (not tied to one job)")
    status_is_error: BoolProperty()

    def active_item(self):
        if 0 <= self.active_job < len(self.jobs):
            return self.jobs[self.active_job]
        return self.jobs[-1] if len(self.jobs) else None


classes = (STAG4D_JobItem, STAG4D_SceneSettings)


def register_props():
    bpy.types.Scene.stag4d = PointerProperty(type=STAG4D_SceneSettings)


def unregister_props():
    if hasattr(bpy.types.Scene, "stag4d"):
        del bpy.types.Scene.stag4d
