"""The "Gaussian splats" geometry-nodes group and its two materials, built in Python (no asset .blend to lose).

Each Gaussian becomes an instance of one square through its centre, parallel to the active camera's image plane
(the instance rotation is the camera's, one value for all) and scaled per axis to the box of the Gaussian's
blurred footprint along the camera's x and y, so it covers the splat's ``Extent``-sigma footprint and little more
(a ray pays one transparent bounce for every square it crosses, seen or not). Every camera ray crosses each
square once, at the centre's depth along the camera axis: the key the backend's rasteriser sorts by, so Cycles
composites them in its order. In the viewport the instances stay instances (never realised or re-transformed),
so a frame change only re-evaluates point fields, and the renderers share one 2-triangle mesh; final renders
realize them into one mesh ("Realize for Render", _realized_for_render), which Cycles traces faster.

The splat material makes each square look like the Gaussian it stands for. It takes the shaded point's offset
from the centre (the instance's location) and the viewing ray, both in the camera's space, into the Gaussian's own
space with two point attributes (the rotation R^-1 F as a rotation vector and 1 / sigma per axis), where the
Gaussian is the unit normal distribution: the ray passes the centre at distance d, and the most the Gaussian
reaches along it is exp(-d^2 / 2). The surface alpha is ``opacity * exp(-d^2 / 2)`` (capped at 0.999 and cut below
1/255 like the rasteriser). This is the backend's per-Gaussian alpha, evaluated for the 3D ray instead of the 2D
projected ellipse; colour is the unlit ``displayColor`` (Emission; sRGB-encoded with set_display_space_blending),
so renders match the backend's. The square's own size and rotation play no part in the material: they only
bound where it is evaluated.

Everything reads point attributes the USD importer creates (docs/bake.md): ``orientations`` (QUATERNION),
``scales`` (FLOAT_VECTOR), ``opacity`` (FLOAT), ``displayColor`` (FLOAT_COLOR), ``radius`` (FLOAT). The positions and
orientations are in the object's own (Y-up) space; the object's +90 degree X rotation takes them to Z-up.
"""

from __future__ import annotations

import math

import bpy

from . import compat

GROUP_NAME = "Gaussian splats"
MODIFIER_NAME = "Gaussian splats"
SPLAT_MATERIAL = "STAG4D splat"
POINTS_MATERIAL = "STAG4D points"
# Bump when the node graph changes: an older group in a saved .blend is rebuilt instead of reused.
# 3: the square root of the scales per component (Math nodes), which Blender 4.2 has, instead of Vector Math POWER.
# 4: the alpha cap 0.999 (the rasteriser's), the display-space colour switch in the splat material.
# 5: a camera-facing square through each Gaussian's centre instead of an ico sphere (one crossing per ray, at the
#    centre's depth: the rasteriser's order; 2 triangles instead of 80).
# 6: squares turned by the instance rotation only, the Gaussian's frame passed to the material (cheaper).
# 7: each square shrunk to its Gaussian's footprint box along the camera's axes, for its opacity and its slant
#    (fewer transparent hits per ray); the material works in camera space from the instance's location.
# 8: the squares realized into one mesh for final renders ("Realize for Render"); the material reads each value
#    from the instancer or from the geometry, whichever has it.
# 9: the realized squares built in the camera's axes and placed as two instances of one mesh (Cycles keeps the
#    mesh's own BVH, whose boxes then lie flat): oblique cameras 3x faster.
# 10: the ray stop in the splat material (off until ray_stop.enable sets a stop map): a camera ray past its
#    pixel's stop depth ends there.
VERSION = 10

DEFAULT_EXTENT = 3.0        # sigmas: the backend's rasteriser cuts Gaussians at 3 sigma as well
# The footprint box (_billboard_frame) is exact for rays parallel to the one through the centre; the rays of a
# perspective camera fan out across a splat by about its size over its distance: the box is widened by
# QUAD_MARGIN + PERSPECTIVE_MARGIN x (radius / distance) to hold them.
QUAD_MARGIN = 1.02
PERSPECTIVE_MARGIN = 2.0
SLANT_LIMIT = 4.0           # |x / z| of a centre in camera space, beyond which the box stops widening (behind/aside)
DEFAULT_MIN_OPACITY = 1.0 / 255.0
MAX_ALPHA = 0.999           # the rasteriser's cap on one Gaussian's alpha
# The splat material's switch between linear emission (blends in linear light, like any Blender material) and
# sRGB-encoded emission (with the scene's display-space blending set-up: blends the sRGB values the way the
# backend's rasteriser does; see set_display_space_blending).
DISPLAY_SPACE_NODE = "stag4d display space"
ROTVEC_ATTR, INV_SIGMA_ATTR = "stag4d_rotation", "stag4d_inv_sigma"  # per splat, for the material (_billboard_frame)
CENTRE_ATTR = "stag4d_centre"  # the Gaussian's centre (object space) on the realized squares: render only
FINAL_ATTR = "stag4d_final"    # 1 on the realized squares (final renders only): where the ray stop may act
# The ray stop (ray_stop.py): the material's image node of the backend's stop_NNNN.png sequence, its on/off Value
# node, and what a 16-bit PNG's 1.0 is in Blender units (exact_display.DEPTH_FULL: 65535 steps of 0.001; 1.0 itself
# means "this pixel never stops").
RAY_STOP_MAP_NODE, RAY_STOP_SWITCH_NODE = "stag4d ray stop map", "stag4d ray stop"
RAY_STOP_FULL = 65535 * 0.001
PIXEL_CENTRE_FILTER = 0.01  # Cycles' smallest pixel filter width: samples at the pixel centre, as the rasteriser
# The backend's rasteriser (gsplat "classic") adds 0.3 px^2 to every projected covariance: thin Gaussians show at
# least about half a pixel wide. Adding the same variance isotropically in 3D, sigma_d = sqrt(0.3) x (the angle of
# one pixel) x (distance to the camera), gives the same blur (an isotropic term commutes with the rotation, so the
# splat's scales become sqrt(s^2 + sigma_d^2)). Default: the backend's 49.1 degree camera at 512 px.
BLUR_PX2 = 0.3
DEFAULT_PIXEL_ANGLE = 2.0 * math.tan(math.radians(49.1) / 2.0) / 512.0


def _socket(ng, name, in_out, socket_type, default=None, min_value=None, max_value=None, description=""):
    s = ng.interface.new_socket(name, in_out=in_out, socket_type=socket_type, description=description)
    if default is not None:
        s.default_value = default
    if min_value is not None:
        s.min_value = min_value
    if max_value is not None:
        s.max_value = max_value
    return s


def _math(nodes, op, x, y, a=None, b=None, links=None):
    n = nodes.new("ShaderNodeMath")
    n.operation = op
    n.location = (x, y)
    for i, v in enumerate((a, b)):
        if v is None:
            continue
        if isinstance(v, (int, float)):
            n.inputs[i].default_value = v
        else:
            links.new(v, n.inputs[i])
    return n.outputs[0]


def _vmath(nodes, op, x, y, a, b=None, links=None, scale=None):
    n = nodes.new("ShaderNodeVectorMath")
    n.operation = op
    n.location = (x, y)
    links.new(a, n.inputs[0])
    if b is not None:
        links.new(b, n.inputs[1])
    if scale is not None:
        links.new(scale, n.inputs["Scale"])
    return n.outputs["Value" if op in ("DOT_PRODUCT", "LENGTH", "DISTANCE") else "Vector"]


def _splat_attribute(nodes, links, name, output, x, y):
    """A per-splat value as the material sees it on instanced squares (an "Instancer" attribute) and on squares
    realized into one mesh (a "Geometry" attribute): each lookup gives 0 where it finds nothing (an instance's
    square has no such attribute; a realized mesh has no instancer, and the fallback to the object's custom
    properties finds none of these names), so their sum is the value in both cases."""
    found = []
    for i, kind in enumerate(("INSTANCER", "GEOMETRY")):
        node = nodes.new("ShaderNodeAttribute")
        node.attribute_type, node.attribute_name = kind, name
        node.location = (x - 150, y - 150 * i)
        found.append(node.outputs[output])
    if output == "Fac":
        return _math(nodes, "ADD", x, y, found[0], found[1], links=links)
    return _vmath(nodes, "ADD", x, y, found[0], found[1], links=links)


def _to_gaussian(nodes, links, vec, x, y):
    """A vector in the camera's space -> the Gaussian's (in sigmas): rotate by the rotation vector R^-1 F, scale by
    1 / sigma per axis (_billboard_frame). The square's own scale plays no part: it only bounds the splat."""
    rotvec = _splat_attribute(nodes, links, ROTVEC_ATTR, "Vector", x - 350, y)
    inv_sigma = _splat_attribute(nodes, links, INV_SIGMA_ATTR, "Vector", x - 200, y - 300)
    angle = _vmath(nodes, "LENGTH", x - 150, y - 150, rotvec, links=links)
    rot = nodes.new("ShaderNodeVectorRotate")
    rot.rotation_type = "AXIS_ANGLE"
    rot.location = (x, y)
    links.new(vec, rot.inputs["Vector"])
    links.new(rotvec, rot.inputs["Axis"])  # normalised by the node
    links.new(angle, rot.inputs["Angle"])
    return _vmath(nodes, "MULTIPLY", x + 150, y, rot.outputs["Vector"], inv_sigma, links=links)


def _to_camera(nodes, links, vec, x, y):
    """A world vector in the camera object's frame (x right, y up, z backward): the renderers' camera space
    looks down +z, so its z is negated back."""
    node = nodes.new("ShaderNodeVectorTransform")
    node.vector_type, node.convert_from, node.convert_to = "VECTOR", "WORLD", "CAMERA"
    node.location = (x, y)
    links.new(vec, node.inputs["Vector"])
    flip = nodes.new("ShaderNodeVectorMath")
    flip.operation = "MULTIPLY"
    flip.location = (x + 150, y)
    links.new(node.outputs["Vector"], flip.inputs[0])
    flip.inputs[1].default_value = (1.0, 1.0, -1.0)
    return flip.outputs["Vector"]


def build_splat_material(name: str = SPLAT_MATERIAL) -> bpy.types.Material:
    """Emission colour from the instance's ``displayColor``, alpha = opacity x the Gaussian along the ray."""
    mat = bpy.data.materials.get(name) or bpy.data.materials.new(name)
    nt = compat.material_node_tree(mat)
    nodes, links = nt.nodes, nt.links
    nodes.clear()

    geom = nodes.new("ShaderNodeNewGeometry")
    geom.location = (-1400, -100)
    info = nodes.new("ShaderNodeObjectInfo")  # of an instance: its location, the Gaussian's centre
    info.location = (-1400, 200)
    # Realized squares: the object's origin plus the centre stored on the mesh (in object space, to world).
    stored = nodes.new("ShaderNodeAttribute")
    stored.attribute_type, stored.attribute_name = "GEOMETRY", CENTRE_ATTR
    stored.location = (-1700, 350)
    to_world = nodes.new("ShaderNodeVectorTransform")
    to_world.vector_type, to_world.convert_from, to_world.convert_to = "VECTOR", "OBJECT", "WORLD"
    to_world.location = (-1550, 350)
    links.new(stored.outputs["Vector"], to_world.inputs["Vector"])
    centre = _vmath(nodes, "ADD", -1300, 300, info.outputs["Location"], to_world.outputs["Vector"], links=links)
    # The shaded point's offset from the centre and the incoming (toward the viewer) direction, both in the
    # camera's space, then in the Gaussian's, where it is the unit normal distribution (_billboard_frame).
    offset = _vmath(nodes, "SUBTRACT", -1200, 200, geom.outputs["Position"], centre, links=links)
    p = _to_gaussian(nodes, links, _to_camera(nodes, links, offset, -1100, 200), -900, 250)
    d = _vmath(nodes, "NORMALIZE", -800, -100,
               _to_gaussian(nodes, links, _to_camera(nodes, links, geom.outputs["Incoming"], -1100, -100), -900,
                            -250), links=links)
    pd = _vmath(nodes, "DOT_PRODUCT", -600, 0, p, d, links=links)
    pp = _vmath(nodes, "DOT_PRODUCT", -600, 200, p, p, links=links)
    # d^2 = |p|^2 - (p . d)^2: squared distance of the ray from the Gaussian's centre, in sigmas.
    dist2 = _math(nodes, "SUBTRACT", -400, 100, pp, _math(nodes, "MULTIPLY", -500, 0, pd, pd, links=links),
                  links=links)
    gauss = _math(nodes, "EXPONENT", -200, 100, _math(nodes, "MULTIPLY", -300, 100, dist2, -0.5, links=links),
                  links=links)

    opacity = _splat_attribute(nodes, links, "opacity", "Fac", -400, -250)
    color = _splat_attribute(nodes, links, "displayColor", "Color", -400, 450)

    alpha = _math(nodes, "MULTIPLY", 0, 0, gauss, opacity, links=links)
    alpha = _math(nodes, "MINIMUM", 150, 0, alpha, MAX_ALPHA, links=links)
    # Below 1/255 the backend drops the Gaussian's contribution; doing the same keeps the silhouettes equal.
    keep = _math(nodes, "GREATER_THAN", 150, -150, alpha, DEFAULT_MIN_OPACITY, links=links)
    alpha = _math(nodes, "MULTIPLY", 300, 0, alpha, keep, links=links)
    alpha = _math(nodes, "MAXIMUM", 450, 0, alpha, _ray_stop(nodes, links), links=links)

    emit = nodes.new("ShaderNodeEmission")
    emit.location = (300, 300)
    links.new(_display_space_switch(nodes, links, color), emit.inputs["Color"])
    emit.inputs["Strength"].default_value = 1.0
    clear = nodes.new("ShaderNodeBsdfTransparent")
    clear.location = (300, 150)
    mix = nodes.new("ShaderNodeMixShader")
    mix.location = (600, 150)
    links.new(alpha, mix.inputs["Fac"])
    links.new(clear.outputs["BSDF"], mix.inputs[1])
    links.new(emit.outputs["Emission"], mix.inputs[2])
    out = nodes.new("ShaderNodeOutputMaterial")
    out.location = (800, 150)
    links.new(mix.outputs["Shader"], out.inputs["Surface"])
    _transparent_settings(mat)
    mat["stag4d_version"] = VERSION
    return mat


def _ray_stop(nodes, links):
    """1 where a camera ray is past its pixel's stop depth (the square then ends the ray: nothing the backend draws
    lies behind it; ray_stop.py), else 0. The stop depth is the RAY_STOP_MAP_NODE image at the shaded point's
    window position. Only on the squares realized for final renders (FINAL_ATTR): the viewport's window is not
    the scene camera's. The switch RAY_STOP_SWITCH_NODE (0 until a map is set) comes last, so Cycles folds the
    whole test away while it is off."""
    coords = nodes.new("ShaderNodeTexCoord")
    coords.location = (-600, -900)
    stop_map = nodes.new("ShaderNodeTexImage")
    stop_map.name = stop_map.label = RAY_STOP_MAP_NODE
    stop_map.interpolation, stop_map.extension = "Closest", "EXTEND"
    stop_map.location = (-400, -900)
    links.new(coords.outputs["Window"], stop_map.inputs["Vector"])
    raw = nodes.new("ShaderNodeSeparateColor")
    raw.location = (-150, -900)
    links.new(stop_map.outputs["Color"], raw.inputs[0])
    stop = _math(nodes, "MULTIPLY", 0, -900, raw.outputs[0], RAY_STOP_FULL, links=links)
    hit = nodes.new("ShaderNodeCameraData")  # the shaded point's depth along the view axis (Blender units)
    hit.location = (-200, -1100)
    past = _math(nodes, "GREATER_THAN", 150, -1000, hit.outputs["View Z Depth"], stop, links=links)
    stops = _math(nodes, "LESS_THAN", 150, -850, raw.outputs[0], 0.99999, links=links)
    camera_ray = nodes.new("ShaderNodeLightPath")  # reflections and shadows see the splats from elsewhere
    camera_ray.location = (0, -1250)
    end = _math(nodes, "MULTIPLY", 300, -1000, past, stops, links=links)
    end = _math(nodes, "MULTIPLY", 300, -1150, end, camera_ray.outputs["Is Camera Ray"], links=links)
    final = nodes.new("ShaderNodeAttribute")
    final.attribute_type, final.attribute_name = "GEOMETRY", FINAL_ATTR
    final.location = (150, -1300)
    end = _math(nodes, "MULTIPLY", 450, -1000, end, final.outputs["Fac"], links=links)
    switch = nodes.new("ShaderNodeValue")
    switch.name = switch.label = RAY_STOP_SWITCH_NODE
    switch.outputs[0].default_value = 0.0
    switch.location = (300, -1300)
    return _math(nodes, "MULTIPLY", 450, -1150, end, switch.outputs[0], links=links)


def _srgb_encode(nodes, links, value, x, y):
    """The sRGB transfer function of one channel: 12.92 c below 0.0031308, else 1.055 c^(1/2.4) - 0.055."""
    low = _math(nodes, "MULTIPLY", x, y, value, 12.92, links=links)
    power = _math(nodes, "POWER", x, y - 60, _math(nodes, "MAXIMUM", x - 100, y - 60, value, 0.0, links=links),
                  1.0 / 2.4, links=links)
    high = _math(nodes, "MULTIPLY_ADD", x + 100, y - 60, power, 1.055, links=links)
    high.node.inputs[2].default_value = -0.055
    above = _math(nodes, "GREATER_THAN", x + 100, y + 60, value, 0.0031308, links=links)
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "FLOAT"
    mix.location = (x + 250, y)
    links.new(above, mix.inputs["Factor"])
    links.new(low, mix.inputs[2])
    links.new(high, mix.inputs[3])
    return mix.outputs[0]


def _display_space_switch(nodes, links, color):
    """``color`` (linear) or its sRGB encoding, chosen by the Value node DISPLAY_SPACE_NODE (0 or 1)."""
    sep = nodes.new("ShaderNodeSeparateColor")
    sep.location = (-400, 700)
    links.new(color, sep.inputs[0])
    comb = nodes.new("ShaderNodeCombineColor")
    comb.location = (150, 700)
    for i in range(3):
        links.new(_srgb_encode(nodes, links, sep.outputs[i], -250, 800 - 200 * i), comb.inputs[i])
    switch = nodes.new("ShaderNodeValue")
    switch.name = switch.label = DISPLAY_SPACE_NODE
    switch.outputs[0].default_value = 0.0
    switch.location = (150, 550)
    mix = nodes.new("ShaderNodeMix")
    mix.data_type = "RGBA"
    mix.location = (300, 550)
    links.new(switch.outputs[0], mix.inputs["Factor"])
    links.new(color, mix.inputs[6])
    links.new(comb.outputs[0], mix.inputs[7])
    return mix.outputs[2]


def build_points_material(name: str = POINTS_MATERIAL) -> bpy.types.Material:
    """The light "points" display: each point a sphere of its Gaussian's colour and opacity."""
    mat = bpy.data.materials.get(name) or bpy.data.materials.new(name)
    nt = compat.material_node_tree(mat)
    nodes, links = nt.nodes, nt.links
    nodes.clear()
    color = nodes.new("ShaderNodeAttribute")
    color.attribute_type, color.attribute_name = "GEOMETRY", "displayColor"
    opacity = nodes.new("ShaderNodeAttribute")
    opacity.attribute_type, opacity.attribute_name = "GEOMETRY", "opacity"
    opacity.location = (0, -200)
    emit = nodes.new("ShaderNodeEmission")
    emit.location = (200, 100)
    links.new(color.outputs["Color"], emit.inputs["Color"])
    clear = nodes.new("ShaderNodeBsdfTransparent")
    clear.location = (200, -50)
    mix = nodes.new("ShaderNodeMixShader")
    mix.location = (400, 0)
    links.new(opacity.outputs["Fac"], mix.inputs["Fac"])
    links.new(clear.outputs["BSDF"], mix.inputs[1])
    links.new(emit.outputs["Emission"], mix.inputs[2])
    out = nodes.new("ShaderNodeOutputMaterial")
    out.location = (600, 0)
    links.new(mix.outputs["Shader"], out.inputs["Surface"])
    _transparent_settings(mat)
    mat["stag4d_version"] = VERSION
    return mat


def _transparent_settings(mat) -> None:
    compat.set_transparency(mat)
    mat.diffuse_color = (0.8, 0.8, 0.8, 1.0)


def build_node_group(splat_material=None, points_material=None) -> bpy.types.NodeTree:
    """The "Gaussian splats" group (reused when an up-to-date one exists in the file)."""
    ng = bpy.data.node_groups.get(GROUP_NAME)
    if ng is not None and ng.get("stag4d_version") == VERSION and ng.bl_idname == "GeometryNodeTree":
        return ng
    if ng is None:
        ng = bpy.data.node_groups.new(GROUP_NAME, "GeometryNodeTree")
    else:
        ng.nodes.clear()
        ng.interface.clear()
    splat_material = splat_material or build_splat_material()
    points_material = points_material or build_points_material()
    nodes, links = ng.nodes, ng.links

    _socket(ng, "Geometry", "INPUT", "NodeSocketGeometry")
    _socket(ng, "Points", "INPUT", "NodeSocketBool", False,
            description="Show plain points instead of ellipsoid splats (lighter, for big sets)")
    _socket(ng, "Extent", "INPUT", "NodeSocketFloat", DEFAULT_EXTENT, 0.5, 6.0,
            description="Size of each splat's ellipsoid in standard deviations")
    _socket(ng, "Min Opacity", "INPUT", "NodeSocketFloat", DEFAULT_MIN_OPACITY, 0.0, 1.0,
            description="Skip Gaussians fainter than this")
    _socket(ng, "Point Size", "INPUT", "NodeSocketFloat", 1.0, 0.0, 10.0,
            description="Radius of the points display, in multiples of each Gaussian's largest sigma")
    _socket(ng, "Pixel Angle", "INPUT", "NodeSocketFloat", DEFAULT_PIXEL_ANGLE, 0.0, 0.1,
            description="Angle one pixel of the render spans (radians); splats are widened by the backend "
                        "rasteriser's 0.3 px^2 screen-space blur at this size. Driven by the scene camera")
    _socket(ng, "Realize for Render", "INPUT", "NodeSocketBool", True,
            description="In final renders, join the splats' squares into one mesh: Cycles traces it several "
                        "times faster than as instances from cameras not aligned with the world's axes. The "
                        "viewport keeps instances (a frame change stays a few ms)")
    _socket(ng, "Splat Material", "INPUT", "NodeSocketMaterial", splat_material)
    _socket(ng, "Points Material", "INPUT", "NodeSocketMaterial", points_material)
    _socket(ng, "Geometry", "OUTPUT", "NodeSocketGeometry")

    gin = nodes.new("NodeGroupInput")
    gin.location = (-900, 0)
    gout = nodes.new("NodeGroupOutput")
    gout.location = (700, 0)

    def named(name, data_type, y):
        n = nodes.new("GeometryNodeInputNamedAttribute")
        n.data_type = data_type
        n.inputs["Name"].default_value = name
        n.location = (-600, y)
        return n.outputs["Attribute"]

    orient = named("orientations", "QUATERNION", -200)
    scales = named("scales", "FLOAT_VECTOR", -350)
    opacity = named("opacity", "FLOAT", -500)
    radius = named("radius", "FLOAT", -650)

    visible = nodes.new("FunctionNodeCompare")
    visible.data_type, visible.operation = "FLOAT", "GREATER_THAN"
    visible.location = (-350, -500)
    links.new(opacity, visible.inputs[0])
    links.new(gin.outputs["Min Opacity"], visible.inputs[1])

    # One square per Gaussian, 2 x Extent sigmas wide, in the instance's own (unit-Gaussian) space; turned below
    # to face the camera, it holds the plane through the Gaussian's centre across the viewing ray.
    quad = nodes.new("GeometryNodeMeshGrid")
    quad.location = (-350, 200)
    quad.inputs["Vertices X"].default_value = quad.inputs["Vertices Y"].default_value = 2
    side = nodes.new("ShaderNodeMath")
    side.operation = "MULTIPLY"
    side.location = (-550, 350)
    links.new(gin.outputs["Extent"], side.inputs[0])
    side.inputs[1].default_value = 2.0  # the instance's scale sizes it to the splat (_billboard_frame)
    links.new(side.outputs[0], quad.inputs["Size X"])
    links.new(side.outputs[0], quad.inputs["Size Y"])
    ico_mat = nodes.new("GeometryNodeSetMaterial")
    ico_mat.location = (-150, 200)
    links.new(quad.outputs["Mesh"], ico_mat.inputs["Geometry"])
    links.new(gin.outputs["Splat Material"], ico_mat.inputs["Material"])

    # Point attributes (displayColor, opacity, ...) become instance attributes: the material reads them
    # with Attribute nodes of type "Instancer".
    inst = nodes.new("GeometryNodeInstanceOnPoints")
    inst.location = (100, 0)
    links.new(visible.outputs[0], inst.inputs["Selection"])
    links.new(ico_mat.outputs["Geometry"], inst.inputs["Instance"])
    blurred, camera, dist = _blurred_scales(nodes, links, gin, scales)
    points = _billboard_frame(nodes, links, gin, inst, orient, blurred, opacity, camera, dist)
    links.new(points, inst.inputs["Points"])
    facing = _realized_for_render(nodes, links, gin, inst.outputs["Instances"], camera)

    pts_mat = nodes.new("GeometryNodeSetMaterial")
    pts_mat.location = (100, -300)
    links.new(gin.outputs["Geometry"], pts_mat.inputs["Geometry"])
    links.new(gin.outputs["Points Material"], pts_mat.inputs["Material"])
    size = nodes.new("ShaderNodeMath")
    size.operation = "MULTIPLY"
    size.location = (100, -550)
    links.new(radius, size.inputs[0])
    links.new(gin.outputs["Point Size"], size.inputs[1])
    set_radius = nodes.new("GeometryNodeSetPointRadius")
    set_radius.location = (300, -300)
    links.new(pts_mat.outputs["Geometry"], set_radius.inputs["Points"])
    links.new(size.outputs[0], set_radius.inputs["Radius"])

    switch = nodes.new("GeometryNodeSwitch")
    switch.input_type = "GEOMETRY"
    switch.location = (500, 0)
    links.new(gin.outputs["Points"], switch.inputs["Switch"])
    links.new(facing, switch.inputs["False"])
    links.new(set_radius.outputs["Points"], switch.inputs["True"])
    links.new(switch.outputs["Output"], gout.inputs["Geometry"])

    ng["stag4d_version"] = VERSION
    ng.use_fake_user = True  # keep it in the .blend even if every modifier using it is removed
    return ng


def _realized_for_render(nodes, links, gin, instances, camera):
    """The instances, or in final renders with "Realize for Render" on, the same squares realized into one mesh
    (the instances' attributes come along, each Gaussian's centre stored as CENTRE_ATTR) built in the camera's
    axes and placed as two instances of that one mesh: turned by the camera's rotation, and a millionth of the
    size (so the mesh has two users and Cycles keeps its own BVH). Why: Cycles bounds each instance, and each
    triangle of a mesh, by a box along its space's axes; a square facing a camera not aligned with those axes
    has a box far bigger than itself, and rays visit many more candidates. One mesh whose axes are the
    camera's keeps the boxes flat (50k splats, camera at elevation 20, azimuth 35: instanced 3x, realized in the
    object's axes 3.5x slower than this). Realizing costs ~30 ms a frame at 50k, so the viewport keeps the
    instances."""
    to_cam = nodes.new("FunctionNodeInvertRotation")
    to_cam.location = (150, 450)
    links.new(camera.outputs["Rotation"], to_cam.inputs[0])
    aligned = nodes.new("GeometryNodeTransform")  # the instances in the camera's axes
    aligned.location = (300, 450)
    links.new(instances, aligned.inputs["Geometry"])
    links.new(to_cam.outputs[0], aligned.inputs["Rotation"])
    centre = nodes.new("GeometryNodeStoreNamedAttribute")
    centre.data_type, centre.domain = "FLOAT_VECTOR", "INSTANCE"
    centre.location = (450, 450)
    centre.inputs["Name"].default_value = CENTRE_ATTR
    links.new(aligned.outputs[0], centre.inputs["Geometry"])
    links.new(nodes.new("GeometryNodeInputPosition").outputs[0], centre.inputs["Value"])
    final = nodes.new("GeometryNodeStoreNamedAttribute")
    final.data_type, final.domain = "FLOAT", "INSTANCE"
    final.location = (450, 300)
    final.inputs["Name"].default_value = FINAL_ATTR
    final.inputs["Value"].default_value = 1.0
    links.new(centre.outputs["Geometry"], final.inputs["Geometry"])
    realize = nodes.new("GeometryNodeRealizeInstances")
    realize.location = (600, 450)
    links.new(final.outputs["Geometry"], realize.inputs[0])
    # Two instances of the mesh at the object's origin, turned by the camera's rotation: the squares back where
    # they were. Cycles bakes an object's transform into a mesh only one object uses (its BVH would be in the
    # world's axes again); the second instance, a millionth of the size, keeps the mesh shared.
    spots = nodes.new("GeometryNodePoints")
    spots.location = (600, 650)
    spots.inputs["Count"].default_value = 2
    first = _math(nodes, "LESS_THAN", 600, 800, nodes.new("GeometryNodeInputIndex").outputs[0], 0.5, links=links)
    size = _math(nodes, "MAXIMUM", 750, 800, first, 1e-6, links=links)
    back = nodes.new("GeometryNodeInstanceOnPoints")
    back.location = (900, 450)
    links.new(spots.outputs[0], back.inputs["Points"])
    links.new(realize.outputs[0], back.inputs["Instance"])
    links.new(camera.outputs["Rotation"], back.inputs["Rotation"])
    links.new(size, back.inputs["Scale"])
    viewport = nodes.new("GeometryNodeIsViewport")
    viewport.location = (300, 600)
    render = nodes.new("FunctionNodeBooleanMath")
    render.operation = "NIMPLY"  # Realize for Render and not the viewport
    render.location = (450, 600)
    links.new(gin.outputs["Realize for Render"], render.inputs[0])
    links.new(viewport.outputs[0], render.inputs[1])
    switch = nodes.new("GeometryNodeSwitch")
    switch.input_type = "GEOMETRY"
    switch.location = (1050, 250)
    links.new(render.outputs[0], switch.inputs["Switch"])
    links.new(instances, switch.inputs["False"])
    links.new(back.outputs["Instances"], switch.inputs["True"])
    return switch.outputs["Output"]


def _blurred_scales(nodes, links, gin, scales):
    """sqrt(scales^2 + sigma_d^2), sigma_d = sqrt(BLUR_PX2) x Pixel Angle x the point's distance to the camera."""
    cam = nodes.new("GeometryNodeInputActiveCamera")
    cam.location = (-900, -850)
    info = nodes.new("GeometryNodeObjectInfo")
    info.transform_space = "RELATIVE"  # the camera in the splat object's own (Y-up) space
    info.location = (-700, -850)
    links.new(cam.outputs[0], info.inputs["Object"])
    pos = nodes.new("GeometryNodeInputPosition")
    pos.location = (-700, -1050)
    dist = nodes.new("ShaderNodeVectorMath")
    dist.operation = "DISTANCE"
    dist.location = (-500, -900)
    links.new(pos.outputs[0], dist.inputs[0])
    links.new(info.outputs["Location"], dist.inputs[1])
    sig = nodes.new("ShaderNodeMath")
    sig.operation = "MULTIPLY"
    sig.location = (-350, -900)
    links.new(dist.outputs["Value"], sig.inputs[0])
    links.new(gin.outputs["Pixel Angle"], sig.inputs[1])
    var = nodes.new("ShaderNodeMath")
    var.operation = "MULTIPLY"
    var.location = (-200, -900)
    links.new(sig.outputs[0], var.inputs[0])
    links.new(sig.outputs[0], var.inputs[1])
    var_px = nodes.new("ShaderNodeMath")
    var_px.operation = "MULTIPLY"
    var_px.location = (-50, -900)
    links.new(var.outputs[0], var_px.inputs[0])
    var_px.inputs[1].default_value = BLUR_PX2
    sq = nodes.new("ShaderNodeVectorMath")
    sq.operation = "MULTIPLY"
    sq.location = (-350, -700)
    links.new(scales, sq.inputs[0])
    links.new(scales, sq.inputs[1])
    add = nodes.new("ShaderNodeVectorMath")
    add.operation = "ADD"
    add.location = (-150, -700)
    links.new(sq.outputs["Vector"], add.inputs[0])
    links.new(var_px.outputs[0], add.inputs[1])
    return _vector_sqrt(nodes, links, add.outputs["Vector"], 0, -700), info, dist.outputs["Value"]


def _billboard_frame(nodes, links, gin, inst, orient, blurred, opacity, camera, dist):
    """Each square lies parallel to the camera's image plane through its Gaussian's centre (instance rotation =
    the camera's, one value for all). Every ray crosses it at the depth of the centre along the camera axis: the
    rasteriser's sort key. The material evaluates the Gaussian in its own space, g = (lambda S)^-1 R^-1 F v for an
    offset v from the centre in camera space (F: the camera's rotation in the object's space, lambda: the
    object's scale): the points carry R^-1 F as a rotation vector (axis x angle) and 1 / (lambda S), read by the
    material as instancer attributes. The instance's scale only bounds the splat, tightly: a ray pays a
    transparent bounce for every square it crosses, whether the splat shows there or not (_splat_bound). Only
    fields on points and a plain Instance on Points: setting instance transforms afterwards costs ~9 ms per frame
    at 50k."""
    cam_rot = camera.outputs["Rotation"]
    inv = nodes.new("FunctionNodeInvertRotation")
    inv.location = (0, -1350)
    links.new(orient, inv.inputs[0])
    combined = nodes.new("FunctionNodeRotateRotation")
    combined.rotation_space = "GLOBAL"  # R^-1 applied after F
    combined.location = (200, -1300)
    links.new(cam_rot, combined.inputs["Rotation"])
    links.new(inv.outputs[0], combined.inputs["Rotate By"])
    axis_angle = nodes.new("FunctionNodeRotationToAxisAngle")
    axis_angle.location = (400, -1300)
    links.new(combined.outputs[0], axis_angle.inputs[0])
    rotvec = _vmath(nodes, "SCALE", 550, -1300, axis_angle.outputs["Axis"], links=links)
    links.new(axis_angle.outputs["Angle"], rotvec.node.inputs["Scale"])
    own = nodes.new("GeometryNodeObjectInfo")  # this object's scale in the world
    own.transform_space = "ORIGINAL"
    own.location = (0, -1650)
    links.new(nodes.new("GeometryNodeSelfObject").outputs[0], own.inputs["Object"])
    world_sigma = _vmath(nodes, "MULTIPLY", 200, -1600, blurred, own.outputs["Scale"], links=links)
    inv_sigma = nodes.new("ShaderNodeVectorMath")
    inv_sigma.operation = "DIVIDE"
    inv_sigma.location = (400, -1600)
    inv_sigma.inputs[0].default_value = (1.0, 1.0, 1.0)
    links.new(world_sigma, inv_sigma.inputs[1])
    out = gin.outputs["Geometry"]
    for i, (name, value) in enumerate(((ROTVEC_ATTR, rotvec), (INV_SIGMA_ATTR, inv_sigma.outputs["Vector"]))):
        store = nodes.new("GeometryNodeStoreNamedAttribute")
        store.data_type, store.domain = "FLOAT_VECTOR", "POINT"
        store.location = (700 + 180 * i, -1000)
        store.inputs["Name"].default_value = name
        links.new(out, store.inputs["Geometry"])
        links.new(value, store.inputs["Value"])
        out = store.outputs["Geometry"]
    links.new(cam_rot, inst.inputs["Rotation"])
    links.new(_splat_bound(nodes, links, gin, combined.outputs[0], blurred, opacity, camera, dist),
              inst.inputs["Scale"])
    return out


def _splat_bound(nodes, links, gin, combined, blurred, opacity, camera, dist):
    """The instance's scale: the square (2 x Extent wide) shrunk to the box, along the camera's x and y, of the
    part of the splat the material draws. Three factors:
    - the footprint of the Gaussian's ellipsoid on the square's plane, seen along the ray through its centre
      (slanted by t = x / z, y / z in camera space): its half-width along the camera's x is the ellipsoid's
      support in the direction a = (1, 0, -t_x), |S R^-1 F a| (likewise y);
    - the radius where the material's alpha falls under 1/255, sqrt(2 ln(255 opacity)) sigmas, if under Extent:
      faint splats are drawn smaller;
    - a margin for the rays of a perspective camera fanning out across the splat (QUAD_MARGIN, PERSPECTIVE_MARGIN).
    The third axis (the square is flat) keeps the largest sigma."""
    to_cam = nodes.new("FunctionNodeInvertRotation")
    to_cam.location = (0, -1900)
    links.new(camera.outputs["Rotation"], to_cam.inputs[0])
    pos = nodes.new("GeometryNodeInputPosition")
    pos.location = (-200, -2000)
    centre = nodes.new("FunctionNodeRotateVector")  # the centre in the camera's space
    centre.location = (200, -1950)
    links.new(_vmath(nodes, "SUBTRACT", 0, -2050, pos.outputs[0], camera.outputs["Location"], links=links),
              centre.inputs["Vector"])
    links.new(to_cam.outputs[0], centre.inputs["Rotation"])
    xyz = nodes.new("ShaderNodeSeparateXYZ")
    xyz.location = (350, -1950)
    links.new(centre.outputs[0], xyz.inputs[0])
    box = nodes.new("ShaderNodeCombineXYZ")
    box.location = (1100, -1900)
    for i in (0, 1):
        y = -2100 - 250 * i
        slant = nodes.new("ShaderNodeClamp")
        slant.location = (650, y)
        links.new(_math(nodes, "DIVIDE", 500, y, xyz.outputs[i], xyz.outputs[2], links=links), slant.inputs[0])
        slant.inputs[1].default_value, slant.inputs[2].default_value = -SLANT_LIMIT, SLANT_LIMIT
        direction = nodes.new("ShaderNodeCombineXYZ")
        direction.location = (800, y)
        direction.inputs[i].default_value = 1.0
        links.new(_math(nodes, "MULTIPLY", 700, y - 80, slant.outputs[0], -1.0, links=links), direction.inputs[2])
        turned = nodes.new("FunctionNodeRotateVector")
        turned.location = (900, y)
        links.new(direction.outputs[0], turned.inputs["Vector"])
        links.new(combined, turned.inputs["Rotation"])
        support = _vmath(nodes, "LENGTH", 1050, y,
                         _vmath(nodes, "MULTIPLY", 950, y, turned.outputs[0], blurred, links=links), links=links)
        links.new(support, box.inputs[i])
    sep = nodes.new("ShaderNodeSeparateXYZ")
    sep.location = (700, -2600)
    links.new(blurred, sep.inputs[0])
    largest = _math(nodes, "MAXIMUM", 900, -2600, _math(nodes, "MAXIMUM", 800, -2600, sep.outputs[0],
                                                        sep.outputs[1], links=links), sep.outputs[2], links=links)
    links.new(largest, box.inputs[2])
    # sqrt(2 ln(opacity / min)): where opacity x exp(-r^2 / 2) = 1/255, the material's cut
    log = _math(nodes, "LOGARITHM", 500, -2800, _math(nodes, "DIVIDE", 400, -2800, opacity, DEFAULT_MIN_OPACITY,
                                                      links=links), math.e, links=links)
    radius = _math(nodes, "MINIMUM", 800, -2800, _math(nodes, "SQRT", 700, -2800, _math(
        nodes, "MAXIMUM", 600, -2800, _math(nodes, "MULTIPLY", 550, -2850, log, 2.0, links=links), 0.0, links=links),
        links=links), gin.outputs["Extent"], links=links)
    shrink = _math(nodes, "DIVIDE", 900, -2800, radius, gin.outputs["Extent"], links=links)
    fan = _math(nodes, "MULTIPLY_ADD", 1000, -2700, _math(nodes, "DIVIDE", 950, -2700, _math(
        nodes, "MULTIPLY", 900, -2700, radius, largest, links=links), dist, links=links), PERSPECTIVE_MARGIN,
        links=links)
    fan.node.inputs[2].default_value = QUAD_MARGIN
    factor = _math(nodes, "MULTIPLY", 1100, -2750, shrink, fan, links=links)
    return _vmath(nodes, "SCALE", 1250, -1900, box.outputs[0], links=links, scale=factor)


def _vector_sqrt(nodes, links, vec, x, y):
    """Component-wise square root with Separate XYZ, three Math SQRT and Combine XYZ: Vector Math has no POWER
    before Blender 4.5 (and no SQRT at all), and this graph is the same on every release."""
    sep = nodes.new("ShaderNodeSeparateXYZ")
    sep.location = (x, y)
    links.new(vec, sep.inputs[0])
    comb = nodes.new("ShaderNodeCombineXYZ")
    comb.location = (x + 300, y)
    for i in range(3):
        root = nodes.new("ShaderNodeMath")
        root.operation = "SQRT"
        root.location = (x + 150, y - 150 * i)
        links.new(sep.outputs[i], root.inputs[0])
        links.new(root.outputs[0], comb.inputs[i])
    return comb.outputs["Vector"]


def drive_pixel_angle(obj, scene, camera=None) -> None:
    """Drive "Pixel Angle" = 2 tan(angle / 2) / N, the angle one render pixel spans, from the camera's lens and
    the scene's resolution (N along the camera's sensor fit; AUTO: the larger side), so the blur follows lens and
    resolution changes. The camera is bound when this is called (the scene camera by default; call again after
    switching cameras: the panel's "Match Camera"); without a camera the backend's 49.1 degree vertical field of
    view is assumed. Only simple expressions: they run without Python, so no auto-run permission is needed."""
    mod = obj.modifiers[MODIFIER_NAME]
    path = f'["{_input_id(mod.node_group, "Pixel Angle")}"]'
    mod.driver_remove(path)
    camera = camera or scene.camera
    if camera is not None and camera.type != "CAMERA":
        camera = None
    fc = mod.driver_add(path)
    drv = fc.driver
    drv.type = "SCRIPTED"
    targets = [("rx", "SCENE", scene, "render.resolution_x"), ("ry", "SCENE", scene, "render.resolution_y"),
               ("p", "SCENE", scene, "render.resolution_percentage")]
    if camera is not None:
        targets += [("a", "CAMERA", camera.data, "angle"), ("f", "CAMERA", camera.data, "sensor_fit")]
        drv.expression = "2 * tan(a / 2) / ((ry if f == 2 else (rx if f == 1 else max(rx, ry))) * p / 100)"
    else:
        drv.expression = f"{2.0 * math.tan(math.radians(49.1) / 2.0):.6f} / (ry * p / 100)"
    for name, id_type, id_block, data_path in targets:
        var = drv.variables.new()
        var.name, var.type = name, "SINGLE_PROP"
        var.targets[0].id_type = id_type
        var.targets[0].id = id_block
        var.targets[0].data_path = data_path
    obj["stag4d_camera"] = camera.name if camera is not None else ""


def set_display_space_blending(scene, enabled: bool) -> None:
    """Render the splats as the backend's rasteriser does, or as Blender renders anything else.

    The rasteriser composites sRGB colour values; Blender composites linear light and encodes to sRGB after, so
    overlapping translucent splats of different colours come out lighter (a 50/50 mix of black and white is
    188/255 in Blender, 128 in the backend). On: the splat material emits the sRGB-encoded colour and the scene's
    view transform becomes "Raw" (no display encoding), so the blend happens on the sRGB values, as in the
    rasteriser. Cycles' pixel filter becomes 0.01 px: every sample goes through the pixel centre, where the
    rasteriser evaluates its pixels (with no Russian roulette on transparent bounces, configure_render, the
    splats are then deterministic: 1 sample gives the image 64 give). Off: linear emission and the view
    transform and filter the scene had before. Both settings are the whole scene's: other lit objects then
    show linear values (darker) without anti-aliasing; for mixed scenes switch this off or use the exact
    display (exact_display.py)."""
    mat = bpy.data.materials.get(SPLAT_MATERIAL)
    if mat is not None and mat.node_tree is not None:
        node = mat.node_tree.nodes.get(DISPLAY_SPACE_NODE)
        if node is not None:
            node.outputs[0].default_value = 1.0 if enabled else 0.0
    view = scene.view_settings
    cycles = getattr(scene, "cycles", None)
    if enabled:
        if view.view_transform != "Raw":
            scene["stag4d_view_transform"] = view.view_transform
        view.view_transform = "Raw"
        view.look = "None"
        if cycles is not None and cycles.filter_width > PIXEL_CENTRE_FILTER:
            scene["stag4d_filter_width"] = cycles.filter_width
            cycles.filter_width = PIXEL_CENTRE_FILTER
    else:
        if view.view_transform == "Raw":
            view.view_transform = scene.get("stag4d_view_transform", "Standard")
        if cycles is not None and cycles.filter_width <= PIXEL_CENTRE_FILTER:
            cycles.filter_width = scene.get("stag4d_filter_width", 1.5)
    scene["stag4d_display_space"] = bool(enabled)


def add_splat_modifier(obj, points: bool = False) -> bpy.types.NodesModifier:
    """Add (or refresh) the "Gaussian splats" modifier at the end of ``obj``'s stack."""
    ng = build_node_group()
    mod = obj.modifiers.get(MODIFIER_NAME)
    if mod is None or mod.type != "NODES":
        mod = obj.modifiers.new(MODIFIER_NAME, "NODES")
    mod.node_group = ng
    set_points_display(obj, points)
    return mod


def _input_id(ng, name: str) -> str:
    for item in ng.interface.items_tree:
        if getattr(item, "in_out", None) == "INPUT" and item.name == name:
            return item.identifier
    raise KeyError(name)


def set_modifier_input(obj, name: str, value) -> None:
    mod = obj.modifiers[MODIFIER_NAME]
    mod[_input_id(mod.node_group, name)] = value
    obj.update_tag()


def get_modifier_input(obj, name: str):
    mod = obj.modifiers[MODIFIER_NAME]
    return mod[_input_id(mod.node_group, name)]


def set_points_display(obj, points: bool) -> None:
    set_modifier_input(obj, "Points", bool(points))


__all__ = ["GROUP_NAME", "MODIFIER_NAME", "set_display_space_blending", "build_node_group", "build_splat_material", "build_points_material",
           "add_splat_modifier", "set_points_display", "set_modifier_input", "get_modifier_input"]
