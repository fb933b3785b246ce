"""Pair conditions for RigFace: the pose/lighting render, the background composite and the expression."""

from __future__ import annotations

from typing import Literal

import numpy as np

from rigface.face import assets, geometry
from rigface.face.mask import composite_background
from rigface.face.head import head_mesh
from rigface.face.render import render_lambertian
from rigface.face.types import MESH_VERTICES, FaceFit, PairConditions

Edit = Literal["expression", "pose", "lighting", "all"]
EDITS = ("expression", "pose", "lighting", "all")


def render_fit(shape_fit: FaceFit, pose_fit: FaceFit, light_fit: FaceFit, size: int | None = None,
               expression_fit: FaceFit | None = None) -> np.ndarray:
    """`shape_fit`'s face shape and albedo, posed like `pose_fit` in its crop, lit by `light_fit`'s SH lighting.

    DECA fits (fit="deca") are drawn as the authors do: `pose_fit`'s head (its FLAME shape, texture, camera and
    crop frame too), `expression_fit`'s (default `shape_fit`) expression and jaw, `light_fit`'s SH light.
    Landmarker fits carry the expression in their shape and ignore it.
    """
    size = size or pose_fit.crop_size
    if shape_fit.deca is not None or pose_fit.deca is not None:
        from rigface.face.backends.deca_fit import render_deca

        return render_deca(pose_fit, expression_fit or shape_fit, light_fit, size)
    proxy = head_mesh()  # the face mesh grown to forehead, skull and jaw (rigface.face.head)
    scale, rot, t = geometry.decompose_matrix(pose_fit.transform)
    k = size / pose_fit.crop_size  # crops of another size: rescale the pose into this frame
    posed = geometry.pose_mesh(proxy.extend(_shape_of(shape_fit)), scale * k, rot, t * k)
    albedo = proxy.extend_albedo(shape_fit.albedo[:MESH_VERTICES])
    image, _ = render_lambertian(posed, proxy.triangles, albedo, light_fit.lighting, size)
    return image


def _shape_of(fit: FaceFit) -> np.ndarray:
    if fit.shape is not None:
        return fit.shape
    return geometry.fit_pose(fit.mesh, assets.canonical_mesh().vertices)[3]


def build_conditions(source: FaceFit, target: FaceFit, edit: Edit = "all") -> PairConditions:
    """Conditions for generating `edit` of `source` towards `target`.

    The render is always the SOURCE's face shape and albedo (identity comes from the source); only its pose
    and lighting come from the fits named below. Crops are normalised (face centred at a fixed relative
    size), so a target's pose placed in the source crop stays in frame.

    | edit       | render: pose / lighting / frame     | background                        | expression |
    |------------|-------------------------------------|-----------------------------------|------------|
    | expression | source / source / source crop       | source crop, source mask gray     | target     |
    | pose       | target / source / source crop       | source crop, source|target gray   | source     |
    | lighting   | source / target / source crop       | source crop, source mask gray     | source     |
    | all        | target / target / target crop       | source crop, source|target gray   | target     |

    "all" is the training pair from one video: the render is aligned with the target crop (the image the
    model learns to produce). Gray is 127, the authors' fill. Masks are returned as given by the fits.
    DECA fits follow deca_fit.DECA_CODE_SOURCES (the authors' code swapping): the same columns, except that a
    pose edit draws the target's whole head (FLAME shape, texture, crop frame) with the source's expression.
    """
    if edit not in EDITS:
        raise ValueError(f"edit must be one of {', '.join(EDITS)}, got {edit!r}")
    if source.crop.shape != target.crop.shape:
        raise ValueError(f"source and target crops differ in size: {source.crop.shape} vs {target.crop.shape}")
    pose_fit = target if edit in ("pose", "all") else source
    light_fit = target if edit in ("lighting", "all") else source
    expr_fit = target if edit in ("expression", "all") else source
    if source.deca is not None or target.deca is not None:  # codes swapped by the table in deca_fit
        from rigface.face.backends.deca_fit import render_deca_edit

        render = render_deca_edit(source, target, edit)
    else:
        render = render_fit(source, pose_fit, light_fit, expression_fit=expr_fit)
    if edit in ("pose", "all"):
        background = composite_background(source.crop, source.mask, target.mask)
    else:
        background = composite_background(source.crop, source.mask)
    return PairConditions(
        render=render,
        background=background,
        expression=np.asarray(expr_fit.expression, dtype=np.float32).copy(),
        mask_source=source.mask,
        mask_target=target.mask,
        edit=edit,
    )
