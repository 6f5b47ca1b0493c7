"""Cameras: hand-computed values and round trips in the pinned convention."""

import math

import numpy as np
import pytest

from stag4d_backend.render import cameras as C


def test_orbit_position_hand_values():
    np.testing.assert_allclose(C.orbit_position(0, 0, 2), [0, 0, 2], atol=1e-12)
    np.testing.assert_allclose(C.orbit_position(30, 30, 2), [0.8660254, 1.0, 1.5], atol=1e-7)
    np.testing.assert_allclose(C.orbit_position(0, 90, 2), [2, 0, 0], atol=1e-12)
    np.testing.assert_allclose(C.orbit_position(-20, 180, 1), [0, -math.sin(math.radians(20)),
                                                               -math.cos(math.radians(20))], atol=1e-12)


def test_stag4d_elevation_sign():
    # The STAG4D code's orbit(-30, 30, 2) is our elevation +30: (0.866, 1.0, 1.5).
    np.testing.assert_allclose(C.stag4d_orbit_position(-30, 30, 2), [0.8660254, 1.0, 1.5], atol=1e-7)
    assert C.to_stag4d_elevation(30) == -30 and C.from_stag4d_elevation(-30) == 30
    for el in (-20.0, 0.0, 30.0):
        assert C.from_stag4d_elevation(C.to_stag4d_elevation(el)) == el


def test_front_camera_viewmat_is_hand_computed():
    # Camera at (0, 0, 2) looking at -Z: OpenCV x right = +X, y down = -Y, z forward = -Z.
    V = C.front_camera().viewmat
    expected = np.array([[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 2], [0, 0, 0, 1]], dtype=float)
    np.testing.assert_allclose(V, expected, atol=1e-12)
    # The origin is 2 units in front, on the optical axis.
    np.testing.assert_allclose(V @ [0, 0, 0, 1], [0, 0, 2, 1], atol=1e-12)
    # A point above the origin (+Y) appears higher in the image, i.e. negative camera y.
    assert (V @ [0, 0.1, 0, 1])[1] < 0
    # A point to the right (+X) appears to the right.
    assert (V @ [0.1, 0, 0, 1])[0] > 0


def test_intrinsics_from_fovy():
    K = C.intrinsics(49.1, 512)
    f = 256 / math.tan(math.radians(49.1 / 2))
    np.testing.assert_allclose(K, [[f, 0, 256], [0, f, 256], [0, 0, 1]])
    assert abs(f - 560.44) < 0.01  # the spec's number at 512 px
    assert abs(C.fovy_from_focal(f, 512) - 49.1) < 1e-9
    K2 = C.intrinsics(40, 320, 160)
    assert K2[0, 2] == 160 and K2[1, 2] == 80 and K2[0, 0] == K2[1, 1]


@pytest.mark.parametrize("el,az", [(0, 0), (30, 30), (-20, 90), (30, 150), (-20, 210), (45, -75), (89, 10)])
def test_viewmat_looks_at_origin_and_is_rigid(el, az):
    cam = C.OrbitCamera(el, az, 2.5)
    V = cam.viewmat
    R = V[:3, :3]
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert abs(np.linalg.det(R) - 1) < 1e-12
    # origin projects to the principal point at depth = radius
    p = V @ [0, 0, 0, 1]
    np.testing.assert_allclose(p[:3], [0, 0, 2.5], atol=1e-12)
    # camera centre maps to camera-space origin
    np.testing.assert_allclose(V @ np.append(cam.position, 1), [0, 0, 0, 1], atol=1e-12)
    # image "up" (negative camera y) has a non-negative world-Y component: the horizon stays level
    up_world = -R[1]
    assert up_world[1] >= -1e-12
    assert abs(np.cross(R[0], [0, 1, 0]) @ R[2]) < 1.0 + 1e-9  # finite, no NaN
    # c2w and w2c are inverses
    np.testing.assert_allclose(cam.c2w @ V, np.eye(4), atol=1e-12)


def test_pole_camera_is_finite():
    V = C.OrbitCamera(90, 0, 2).viewmat
    assert np.isfinite(V).all()
    np.testing.assert_allclose(V @ [0, 0, 0, 1], [0, 0, 2, 1], atol=1e-9)


def test_anchor_poses_and_grid():
    cams = C.anchor_cameras()
    assert [c.azimuth for c in cams] == [30, 90, 150, 210, 270, 330]
    assert [c.elevation for c in cams] == [30, -20, 30, -20, 30, -20]
    assert all(c.size == 320 and c.radius == 2 and c.fovy == 49.1 for c in cams)
    # view 0 is above and to the +X side of the front: camera y > 0, x > 0
    p0 = cams[0].position
    assert p0[1] > 0 and p0[0] > 0
    # relative to a non-zero input elevation
    assert C.anchor_cameras(input_elevation=10)[1].elevation == -10
    assert [C.anchor_tile_box(k) for k in range(6)] == [
        (0, 0, 320, 320), (320, 0, 640, 320), (0, 320, 320, 640),
        (320, 320, 640, 640), (0, 640, 320, 960), (320, 640, 640, 960)]
    with pytest.raises(ValueError):
        C.anchor_tile_box(6)


def test_anchor_index_for_azimuth_matches_stag4d_table():
    hors = [30, 59, 60, 179, -30, -90, -150, -180]
    assert [C.anchor_index_for_azimuth(h) for h in hors] == [0, 0, 1, 2, 5, 4, 3, 3]
    # the STAG4D code's integer rule for every integer azimuth it can draw
    for hor in range(-180, 180):
        if abs(hor) < 30:
            continue
        k = hor // 60 if hor > 0 else (360 + hor) // 60
        assert C.anchor_index_for_azimuth(hor) == k, hor


def test_camera_dict_round_trip():
    cam = C.OrbitCamera(12.5, -40.0, 2.2, 39.6, 256)
    d = dict(cam.to_dict(), index=3, frame=7)
    assert C.OrbitCamera.from_dict(d) == cam
    assert C.OrbitCamera.from_dict({"elevation": "10", "size": "128"}) == C.OrbitCamera(10.0, size=128)


def test_y_up_to_z_up_points_and_back():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(10, 3))
    pb = C.y_up_to_z_up_points(p)
    np.testing.assert_allclose(pb, np.stack([p[:, 0], -p[:, 2], p[:, 1]], 1))
    np.testing.assert_allclose(pb, p @ C.Y_UP_TO_Z_UP.T)
    np.testing.assert_allclose(C.z_up_to_y_up_points(pb), p)
    # Y-up +Y (world up) becomes Blender +Z; our front (+Z) becomes Blender -Y ("Front" view looks from -Y)
    np.testing.assert_allclose(C.y_up_to_z_up_points([0, 1, 0]), [0, 0, 1])
    np.testing.assert_allclose(C.y_up_to_z_up_points([0, 0, 1]), [0, -1, 0])


def _quat_to_matrix(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def test_y_up_to_z_up_quats_rotate_frames_consistently():
    rng = np.random.default_rng(1)
    for q in rng.normal(size=(5, 4)):
        q = q / np.linalg.norm(q)
        qb = C.y_up_to_z_up_quats(q)
        np.testing.assert_allclose(_quat_to_matrix(qb), C.Y_UP_TO_Z_UP @ _quat_to_matrix(q), atol=1e-12)
    np.testing.assert_allclose(_quat_to_matrix(C.Y_UP_TO_Z_UP_QUAT), C.Y_UP_TO_Z_UP, atol=1e-12)


def test_blender_camera_matrix_looks_at_origin():
    cam = C.OrbitCamera(30, 30, 2)
    m = C.blender_camera_matrix(cam)
    np.testing.assert_allclose(m[:3, 3], C.y_up_to_z_up_points(cam.position), atol=1e-12)
    look = -m[:3, 2]  # Blender cameras look down local -Z
    np.testing.assert_allclose(look, -m[:3, 3] / np.linalg.norm(m[:3, 3]), atol=1e-12)
    assert m[2, 1] > 0  # local +Y (image up) points upward in Z-up world
    front = C.blender_camera_matrix(C.front_camera())
    np.testing.assert_allclose(front[:3, 3], [0, -2, 0], atol=1e-12)  # Blender's Front view side


def test_blender_conversion_matches_mathutils():
    """Round trip through real Blender math: +90 degrees about X is the conversion Blender users expect."""
    pytest.importorskip("bpy", reason="bpy (Blender as a module) not installed")
    import mathutils  # provided by bpy
    rot = mathutils.Matrix.Rotation(math.radians(90.0), 3, "X")
    np.testing.assert_allclose(np.array(rot), C.Y_UP_TO_Z_UP, atol=1e-7)
    q = mathutils.Quaternion((1.0, 0.0, 0.0), math.radians(90.0))
    np.testing.assert_allclose(list(q), C.Y_UP_TO_Z_UP_QUAT, atol=1e-7)
    v = mathutils.Vector((0.3, -0.2, 0.7))
    np.testing.assert_allclose(list(rot @ v), C.y_up_to_z_up_points([0.3, -0.2, 0.7]), atol=1e-6)


def test_viewmat_from_blender_local_inverts_the_blender_camera():
    """The exact display's camera: a Blender camera matrix seen from the splat object's space (the importer's +90
    degrees about X, here also scaled by 2) gives back the orbit camera's own viewmat, and depths scale by 2."""
    from stag4d_backend.render.cameras import blender_camera_matrix, viewmat_from_blender_local

    orbit = C.OrbitCamera(elevation=25.0, azimuth=-70.0, radius=2.5)
    obj = np.eye(4)
    obj[:3, :3] = 2.0 * np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]])
    viewmat, scale = viewmat_from_blender_local(np.linalg.inv(obj) @ blender_camera_matrix(orbit))
    expected = orbit.viewmat.copy()
    expected[:3, 3] /= 2.0  # the object's units are half the world's
    np.testing.assert_allclose(viewmat, expected, atol=1e-12)
    assert scale == pytest.approx(2.0)
    sheared = np.eye(4)
    sheared[1, 1] = 2.0
    with pytest.raises(ValueError, match="uniform scale"):
        viewmat_from_blender_local(sheared)


def test_render_views_rejects_bad_views(tmp_path):
    from stag4d_backend.export.camera_views import read_views
    from stag4d_backend.export.turntable import CamerasError

    path = tmp_path / "views.json"
    path.write_text('[{"index": 0, "frame": 0}]')
    with pytest.raises(CamerasError, match="needs index, frame, camera_in_object, K, width, height"):
        read_views(path)
    path.write_text('[{"index": 0, "frame": 0, "camera_in_object": [[1, 0], [0, 1]], "K": [[1, 0, 0], [0, 1, 0], '
                    '[0, 0, 1]], "width": 8, "height": 8}]')
    with pytest.raises(CamerasError, match="finite 4x4"):
        read_views(path)
