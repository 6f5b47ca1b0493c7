"""The six animated ground-truth scenes of the hard evaluation set, built with bpy (Blender world: Z up, the input
camera at -Y looking toward +Y, so an object "faces" -Y).

Every scene is a function ``build(bpy) -> pose`` that creates its objects in the current (empty) Blender scene and
returns ``pose(t)``, which sets every animated value for the clip time ``t`` in [0, 1) (no keyframes: the renderer
poses the scene exactly for each time it renders, in-between times included). Materials are emission only
(colour independent of the view and of lighting) with procedural textures in Generated or Object coordinates,
so the texture moves with the surface, deformations included (Generated = the undeformed mesh's coordinates).
Everything stays inside a sphere of radius ~0.65 around the origin, like the example creature.
"""

from __future__ import annotations

import math

TAU = 2.0 * math.pi


# --- materials -------------------------------------------------------------------------------------------------

def _material(bpy, name: str, kind: str, colors, scale: float = 1.0, coords: str = "Generated",
              direction: str = "X"):
    """Emission-only material. kind: 'solid' (colors[0]), 'checker' (two colours), 'stripes' (two colours, bands
    along ``direction`` of ``coords``), 'rainbow' (the Generated coordinate as colour, times a checker)."""
    mat = bpy.data.materials.new(name)
    mat.use_nodes = True
    nt = mat.node_tree
    nt.nodes.clear()
    out = nt.nodes.new("ShaderNodeOutputMaterial")
    emit = nt.nodes.new("ShaderNodeEmission")
    emit.inputs["Strength"].default_value = 1.0
    nt.links.new(emit.outputs["Emission"], out.inputs["Surface"])
    c = [tuple(x) + (1.0,) for x in colors]
    if kind == "solid":
        emit.inputs["Color"].default_value = c[0]
        return mat
    tc = nt.nodes.new("ShaderNodeTexCoord")
    if kind in ("checker", "rainbow"):
        chk = nt.nodes.new("ShaderNodeTexChecker")
        chk.inputs["Scale"].default_value = scale
        chk.inputs["Color1"].default_value = c[0]
        chk.inputs["Color2"].default_value = c[1]
        nt.links.new(tc.outputs[coords], chk.inputs["Vector"])
        if kind == "checker":
            nt.links.new(chk.outputs["Color"], emit.inputs["Color"])
        else:
            mix = nt.nodes.new("ShaderNodeVectorMath")
            mix.operation = "MULTIPLY"
            nt.links.new(tc.outputs["Generated"], mix.inputs[0])
            nt.links.new(chk.outputs["Color"], mix.inputs[1])
            nt.links.new(mix.outputs["Vector"], emit.inputs["Color"])
        return mat
    if kind == "stripes":
        wave = nt.nodes.new("ShaderNodeTexWave")
        wave.wave_type = "BANDS"
        wave.bands_direction = direction
        wave.inputs["Scale"].default_value = scale
        wave.inputs["Distortion"].default_value = 0.0
        wave.inputs["Detail"].default_value = 0.0
        ramp = nt.nodes.new("ShaderNodeValToRGB")
        ramp.color_ramp.interpolation = "CONSTANT"
        ramp.color_ramp.elements[0].color = c[0]
        ramp.color_ramp.elements[1].position = 0.5
        ramp.color_ramp.elements[1].color = c[1]
        nt.links.new(tc.outputs[coords], wave.inputs["Vector"])
        nt.links.new(wave.outputs["Fac"], ramp.inputs["Fac"])
        nt.links.new(ramp.outputs["Color"], emit.inputs["Color"])
        return mat
    raise ValueError(kind)


# --- meshes ----------------------------------------------------------------------------------------------------

def _mesh_object(bpy, name, verts, faces, material, parent=None, location=(0.0, 0.0, 0.0)):
    me = bpy.data.meshes.new(name)
    me.from_pydata(verts, [], faces)
    me.update()
    obj = bpy.data.objects.new(name, me)
    bpy.context.scene.collection.objects.link(obj)
    obj.data.materials.append(material)
    obj.parent = parent
    obj.location = location
    return obj


def _ellipsoid(bpy, name, radii, material, parent=None, location=(0.0, 0.0, 0.0), seg=48, rings=24):
    rx, ry, rz = radii if isinstance(radii, (tuple, list)) else (radii,) * 3
    verts = [(0.0, 0.0, -rz)]
    for i in range(1, rings):
        th = math.pi * i / rings - math.pi / 2
        for j in range(seg):
            ph = TAU * j / seg
            verts.append((rx * math.cos(th) * math.cos(ph), ry * math.cos(th) * math.sin(ph), rz * math.sin(th)))
    verts.append((0.0, 0.0, rz))
    faces = [(0, 1 + (j + 1) % seg, 1 + j) for j in range(seg)]
    for i in range(rings - 2):
        a, b = 1 + i * seg, 1 + (i + 1) * seg
        faces += [(a + j, a + (j + 1) % seg, b + (j + 1) % seg, b + j) for j in range(seg)]
    top, last = len(verts) - 1, 1 + (rings - 2) * seg
    faces += [(last + j, last + (j + 1) % seg, top) for j in range(seg)]
    return _mesh_object(bpy, name, verts, faces, material, parent, location)


def _tube(bpy, name, radius, length, material, axis="Z", parent=None, location=(0.0, 0.0, 0.0), seg=32,
          rings=32):
    """A capped cylinder from 0 to ``length`` along ``axis`` with many rings (so deform modifiers bend it)."""
    def place(a, b, h):  # (a, b) around the axis, h along it
        return {"X": (h, a, b), "Y": (a, h, b), "Z": (a, b, h)}[axis]

    verts = []
    for i in range(rings + 1):
        h = length * i / rings
        verts += [place(radius * math.cos(TAU * j / seg), radius * math.sin(TAU * j / seg), h) for j in range(seg)]
    faces = []
    for i in range(rings):
        a, b = i * seg, (i + 1) * seg
        faces += [(a + j, a + (j + 1) % seg, b + (j + 1) % seg, b + j) for j in range(seg)]
    faces += [tuple(reversed(range(seg))), tuple(range(rings * seg, (rings + 1) * seg))]
    return _mesh_object(bpy, name, verts, faces, material, parent, location)


def _box(bpy, name, size, material, parent=None, location=(0.0, 0.0, 0.0)):
    sx, sy, sz = (s / 2 for s in size)
    verts = [(x * sx, y * sy, z * sz) for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)]
    faces = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return _mesh_object(bpy, name, verts, faces, material, parent, location)


def _empty(bpy, name, parent=None, location=(0.0, 0.0, 0.0)):
    e = bpy.data.objects.new(name, None)
    bpy.context.scene.collection.objects.link(e)
    e.parent = parent
    e.location = location
    return e


def _simple_deform(obj, name, method, axis, origin):
    mod = obj.modifiers.new(name, "SIMPLE_DEFORM")
    mod.deform_method = method
    mod.deform_axis = axis
    mod.origin = origin
    return mod


# --- the scenes --------------------------------------------------------------------------------------------------

def character(bpy):
    """Articulated character: arms wave out of phase, the head turns and nods, the body sways; eyes, hair
    strands and checkered hands are the fine detail."""
    root = _empty(bpy, "root")
    body = _ellipsoid(bpy, "body", (0.19, 0.14, 0.24), _material(bpy, "shirt", "stripes", [(0.8, 0.1, 0.1),
                      (0.95, 0.8, 0.1)], 3.0, direction="Z"), root, (0.0, 0.0, -0.1))
    neck = _empty(bpy, "neck", root, (0.0, 0.0, 0.12))
    skin = _material(bpy, "skin", "solid", [(0.9, 0.6, 0.4)])
    head = _ellipsoid(bpy, "head", 0.15, skin, neck, (0.0, 0.0, 0.15))
    white, black = _material(bpy, "white", "solid", [(1, 1, 1)]), _material(bpy, "black", "solid", [(0, 0, 0)])
    for s in (-1, 1):
        _ellipsoid(bpy, f"eye{s}", 0.04, white, head, (0.06 * s, -0.12, 0.03), 16, 8)
        _ellipsoid(bpy, f"pupil{s}", 0.02, black, head, (0.062 * s, -0.155, 0.03), 12, 6)
    hair = _material(bpy, "hair", "solid", [(0.15, 0.05, 0.5)])
    for i in range(7):
        strand = _tube(bpy, f"hair{i}", 0.009, 0.14, hair, "Z", head, (-0.09 + 0.03 * i, 0.0, 0.12), 8, 2)
        strand.rotation_euler = (0.0, 0.35 * (i - 3) / 3, 0.0)
    sleeve = _material(bpy, "sleeve", "stripes", [(0.1, 0.3, 0.9), (0.9, 0.9, 0.95)], 2.5, direction="X")
    hand = _material(bpy, "hand", "checker", [(0.05, 0.05, 0.05), (1.0, 1.0, 1.0)], 40.0, coords="Object")
    shoulders = []
    for s in (-1, 1):
        sh = _empty(bpy, f"shoulder{s}", root, (0.17 * s, 0.0, 0.0))
        arm = _tube(bpy, f"arm{s}", 0.04, 0.28, sleeve, "X", sh, (0.0, 0.0, 0.0), 16, 4)
        if s < 0:
            arm.scale = (-1.0, 1.0, 1.0)
        _box(bpy, f"hand{s}", (0.09, 0.09, 0.09), hand, sh, (0.32 * s, 0.0, 0.0))
        shoulders.append(sh)
    legs = []
    pants = _material(bpy, "pants", "solid", [(0.2, 0.5, 0.2)])
    for s in (-1, 1):
        hip = _empty(bpy, f"hip{s}", root, (0.08 * s, 0.0, -0.28))
        leg = _tube(bpy, f"leg{s}", 0.045, 0.22, pants, "Z", hip, (0.0, 0.0, 0.0), 16, 2)
        leg.rotation_euler = (math.pi, 0.0, 0.0)
        legs.append(hip)

    def pose(t):
        root.location = (0.0, 0.0, 0.03 * math.sin(2 * TAU * t))
        root.rotation_euler = (0.0, 0.0, 0.35 * math.sin(TAU * t))
        neck.rotation_euler = (0.25 * math.sin(2 * TAU * t), 0.0, 1.0 * math.sin(TAU * t + 0.7))
        for k, (sh, s) in enumerate(zip(shoulders, (-1, 1))):
            wave = 0.9 * math.sin(2 * TAU * t + k * math.pi)
            sh.rotation_euler = (0.0, -s * wave, 0.5 * math.sin(TAU * t + k))
        for k, hip in enumerate(legs):
            hip.rotation_euler = (0.4 * math.sin(2 * TAU * t + k * math.pi), 0.0, 0.0)
    return pose


def ball(bpy):
    """Squash and stretch with spin: a striped ball bounces twice, squashes at each contact (along the world
    vertical, volume kept) and spins one and a half turns about a tilted axis."""
    squash = _empty(bpy, "squash")
    spin = _empty(bpy, "spin", squash)
    mat = _material(bpy, "stripes", "stripes", [(0.95, 0.95, 0.2), (0.1, 0.2, 0.8)], 2.0, direction="X")
    _ellipsoid(bpy, "ball", 0.33, mat, spin, seg=64, rings=32)
    band = _material(bpy, "band", "solid", [(0.9, 0.1, 0.1)])
    ring = _tube(bpy, "ring", 0.333, 0.06, band, "Z", spin, (0.0, 0.0, -0.03), 64, 1)
    ring.rotation_euler = (math.pi / 2, 0.0, 0.0)

    def pose(t):
        h = abs(math.sin(TAU * t))                          # contacts at t = 0 and 0.5
        sq = 0.45 * max(0.0, 1.0 - h / 0.25)                # squash near contact
        st = 0.15 * max(0.0, min(1.0, (h - 0.25) / 0.3)) * (1.0 - h)  # stretch while moving fast
        sz = (1.0 - sq) * (1.0 + st)
        sxy = 1.0 / math.sqrt(sz)
        squash.scale = (sxy, sxy, sz)
        squash.location = (0.12 * math.sin(TAU * t), 0.0, -0.5 + 0.33 * sz + 0.45 * h)
        spin.rotation_euler = (0.4, 0.0, 1.5 * TAU * t)
    return pose


def column(bpy):
    """Twist and bend: a checkered column twists up to +-200 degrees and bends up to 70 degrees, the bend plane
    turning over the clip."""
    origin = _empty(bpy, "deform_origin", location=(0.0, 0.0, -0.5))
    mat = _material(bpy, "column", "checker", [(0.1, 0.6, 0.2), (0.95, 0.95, 0.9)], 8.0)
    col = _tube(bpy, "column", 0.15, 1.0, mat, "Z", location=(0.0, 0.0, -0.5), seg=48, rings=48)
    cap = _material(bpy, "cap", "stripes", [(0.9, 0.3, 0.1), (0.2, 0.1, 0.6)], 4.0, direction="Y")
    col.data.materials.append(cap)
    for poly in col.data.polygons[-2:]:  # the two caps
        poly.material_index = 1
    twist = _simple_deform(col, "twist", "TWIST", "Z", origin)
    bend = _simple_deform(col, "bend", "BEND", "X", origin)

    def pose(t):
        twist.angle = math.radians(200.0) * math.sin(TAU * t)
        bend.angle = math.radians(70.0) * math.sin(TAU * t + 1.0)
        origin.rotation_euler = (0.0, 0.0, 0.5 * math.pi * t)
    return pose


def fast_cube(bpy):
    """Fast translation across the frame with rotation: a colourful checkered cube crosses the frame twice,
    tumbling two turns."""
    mat = _material(bpy, "cube", "rainbow", [(1.0, 1.0, 1.0), (0.45, 0.45, 0.45)], 3.0)
    cube = _box(bpy, "cube", (0.4, 0.4, 0.4), mat)

    def pose(t):
        tri = 1.0 - 4.0 * abs(((t + 0.25) % 1.0) - 0.5)   # -1 .. 1 .. -1: crosses twice
        cube.location = (0.42 * tri, 0.1 * math.sin(2 * TAU * t), 0.12 * math.sin(TAU * t))
        cube.rotation_euler = (TAU * t, 2.0 * TAU * t, 0.3)
    return pose


def whip(bpy):
    """A thin part whipping: a creature's long thin striped tail lashes up/down and toward/away from the camera
    (two cycles), and an antenna on its head flicks (three cycles)."""
    body_mat = _material(bpy, "body", "checker", [(0.5, 0.2, 0.6), (0.85, 0.7, 0.95)], 4.0)
    body = _ellipsoid(bpy, "body", (0.22, 0.16, 0.17), body_mat, location=(-0.22, 0.0, -0.05))
    eye = _material(bpy, "eye", "solid", [(0.0, 0.0, 0.0)])
    _ellipsoid(bpy, "eye", 0.03, eye, body, (-0.12, -0.135, 0.06), 12, 6)
    tail_mat = _material(bpy, "tail", "stripes", [(1.0, 0.5, 0.0), (0.1, 0.1, 0.1)], 3.0, direction="X")
    tail_origin = _empty(bpy, "tail_origin", location=(-0.02, 0.0, -0.05))
    tail = _tube(bpy, "tail", 0.022, 0.62, tail_mat, "X", location=(-0.02, 0.0, -0.05), seg=12, rings=64)
    lash = _simple_deform(tail, "lash", "BEND", "Z", tail_origin)  # bends in the origin's XY plane
    ant_mat = _material(bpy, "antenna", "stripes", [(0.1, 0.8, 0.9), (0.9, 0.1, 0.4)], 2.0, direction="Z")
    antenna = _tube(bpy, "antenna", 0.012, 0.32, ant_mat, "Z", location=(-0.25, 0.0, 0.1), seg=8, rings=32)
    flick = _simple_deform(antenna, "flick", "BEND", "X", _empty(bpy, "antenna_origin", antenna))

    def pose(t):
        lash.angle = math.radians(150.0) * math.sin(2 * TAU * t)
        tail_origin.rotation_euler = (math.pi / 2 + 0.7 * math.cos(2 * TAU * t), 0.0, 0.0)  # up/down and in depth
        flick.angle = math.radians(100.0) * math.sin(3 * TAU * t)
        antenna.rotation_euler = (0.0, 0.4 * math.sin(3 * TAU * t + 1.0), 0.0)
        body.rotation_euler = (0.0, 0.0, 0.2 * math.sin(TAU * t))
    return pose


def fine_texture(bpy):
    """Fine texture: a panel with a 4-pixel checker and lettering on both faces, swinging and tilting."""
    root = _empty(bpy, "root")
    mat = _material(bpy, "panel", "checker", [(0.05, 0.1, 0.5), (0.95, 0.9, 0.6)], 30.0, coords="Object")
    _box(bpy, "panel", (0.7, 0.1, 0.5), mat, root)
    ink = _material(bpy, "ink", "solid", [(0.9, 0.05, 0.05)])
    for label, y, rz in (("STAG 4D", -0.052, 0.0), ("BLENDER", 0.052, math.pi)):
        curve = bpy.data.curves.new(label, "FONT")
        curve.body = label
        curve.size = 0.14
        curve.extrude = 0.003
        curve.align_x, curve.align_y = "CENTER", "CENTER"
        text = bpy.data.objects.new(label, curve)
        bpy.context.scene.collection.objects.link(text)
        text.data.materials.append(ink)
        text.parent = root
        text.location = (0.0, y, 0.0)
        text.rotation_euler = (math.pi / 2, 0.0, rz)
    knob = _material(bpy, "knob", "stripes", [(0.1, 0.1, 0.1), (0.95, 0.95, 0.95)], 25.0, direction="Z")
    _ellipsoid(bpy, "knob", 0.09, knob, root, (0.0, 0.0, 0.33))

    def pose(t):
        root.rotation_euler = (0.25 * math.sin(2 * TAU * t), 0.0, 0.7 * math.sin(TAU * t))
        root.location = (0.0, 0.0, 0.05 * math.sin(TAU * t))
    return pose


SCENES = {"character": character, "ball": ball, "column": column, "fast_cube": fast_cube, "whip": whip,
          "fine_texture": fine_texture}
