"""Model-free checks of the face geometry, SH lighting, rasterizer, compositing and paste-back."""

from __future__ import annotations

import numpy as np
import pytest

from rigface.face import assets, geometry
from rigface.face.mask import composite_background
from rigface.face.paste import paste_back
from rigface.face.render import rasterize, render_lambertian


@pytest.mark.parametrize("yaw, pitch, roll", [(0, 0, 0), (30, -10, 5), (-45, 20, -30), (10, 60, 80)])
def test_euler_round_trip(yaw, pitch, roll):
    rot = geometry.rotation_from_euler(yaw, pitch, roll)
    assert np.allclose(rot @ rot.T, np.eye(3), atol=1e-9)
    assert geometry.euler_from_rotation(rot) == pytest.approx((yaw, pitch, roll), abs=1e-6)


def test_similarity_fit_recovers_a_known_pose():
    canon = assets.canonical_mesh().vertices
    rot = geometry.rotation_from_euler(20, -5, 12)
    mesh = geometry.pose_mesh(canon, 11.0, rot, np.array([250.0, -260.0, 0.0]))
    s, r, t, shape = geometry.fit_pose(mesh, canon)
    assert s == pytest.approx(11.0, rel=1e-4)
    assert geometry.euler_from_rotation(r) == pytest.approx((20, -5, 12), abs=1e-3)
    assert np.abs(shape - canon).max() < 1e-3
    # Conventions: a face turned by +yaw shows its nose tip (vertex 1) to the image's right of the centre.
    assert mesh[1, 0] > 250.0


def test_rasterizer_covers_a_square_exactly():
    verts = np.array([[10, 10, 0], [30, 10, 0], [30, 30, 0], [10, 30, 0]], dtype=np.float32)
    # Facing the camera = counter-clockwise in the y-up view frame = clockwise on screen here.
    tris = np.array([[0, 2, 1], [0, 3, 2]])
    pix, tid, bary = rasterize(verts, tris, 40)
    assert len(np.unique(pix)) == len(pix)
    ys, xs = np.divmod(pix, 40)
    inner = {(y, x) for y in range(10, 30) for x in range(10, 30)}
    assert inner <= set(zip(ys.tolist(), xs.tolist()))  # every pixel centre inside is covered
    assert xs.min() >= 9 and xs.max() <= 30 and ys.min() >= 9 and ys.max() <= 30  # at most a 1-px rim
    assert np.allclose(bary.sum(1), 1.0)
    back, _, _ = rasterize(verts, tris[:, ::-1], 40)
    assert len(back) == 0  # back faces are culled


def test_sh_lighting_fit_recovers_direction():
    """Colours made with known SH lighting from the right are fitted back with a positive x band."""
    canon = assets.canonical_mesh()
    mesh = geometry.pose_mesh(canon.vertices, 12.0, np.eye(3), np.array([256.0, -256.0, 0.0]))
    light = np.zeros((9, 3), np.float32)
    light[0], light[3] = 2.0, 1.0  # ambient + light from +x (the image's right)
    img, cover = render_lambertian(mesh, canon.triangles, np.full((468, 3), 0.5, np.float32), light, 512)
    # Fill the holes around the face with the edge colour so bilinear sampling at the rim is clean.
    normals = geometry.vertex_normals(geometry.image_to_view(mesh), canon.triangles)
    fitted, albedo, rmse = geometry.fit_lighting(img, mesh, normals)
    assert (fitted[3] > 0.5).all() and (fitted[0] > 1.5).all()
    assert rmse < 0.05


def test_composite_background_and_errors():
    crop = np.full((8, 8, 3), 200, np.uint8)
    a = np.zeros((8, 8), np.uint8)
    b = np.zeros((8, 8), np.uint8)
    a[:2], b[-2:] = 255, 255
    out = composite_background(crop, a, b)
    assert (out[:2] == 127).all() and (out[-2:] == 127).all() and (out[2:-2] == 200).all()
    with pytest.raises(ValueError):
        composite_background(crop, np.zeros((4, 4), np.uint8))


def test_paste_back_clips_boxes_outside_the_frame():
    frame = np.zeros((100, 100, 3), np.uint8)
    crop = np.full((64, 64, 3), 255, np.uint8)
    out = paste_back(frame, crop, (-20, -20, 40, 40))
    assert (out[:40, :40] == 255).all() and (out[40:] == 0).all() and (out[:, 40:] == 0).all()
    assert (frame == 0).all()  # the input is not modified
    far = paste_back(frame, crop, (200, 200, 260, 260))
    assert (far == 0).all()
    with pytest.raises(ValueError):
        paste_back(frame, crop, (10, 10, 10, 40))


def test_types_to_meta_is_json():
    import json

    from rigface.face.types import FaceFit, FaceSkip, Pose, SkipReason

    fit = FaceFit(
        crop_box=(1, 2, 3, 4),
        crop=np.zeros((4, 4, 3), np.uint8),
        landmarks=np.zeros((478, 3), np.float32),
        pose=Pose(1.0, 2.0, 3.0),
        transform=np.eye(4, dtype=np.float32),
        expression=np.zeros(52, np.float32),
        lighting=np.zeros((9, 3), np.float32),
        albedo=np.zeros((468, 3), np.float32),
        mesh=np.zeros((468, 3), np.float32),
        mask=np.zeros((4, 4), np.uint8),
        scores={"detection": np.float32(0.9)},
    )
    meta = json.loads(json.dumps(fit.to_meta()))
    assert meta["pose"]["roll"] == 3.0 and meta["expression_dim"] == 52 and meta["crop_size"] == 4
    assert FaceSkip(SkipReason.too_small, "x").to_meta() == {"reason": "too_small", "detail": "x"}
    assert SkipReason("several_faces") is SkipReason.several_faces
