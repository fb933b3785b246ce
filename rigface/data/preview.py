"""A grid PNG of training pairs: source, target, render, background and the two masks per row."""

from __future__ import annotations

import io
from typing import Iterable

import numpy as np
from PIL import Image, ImageDraw

from rigface.data.schema import PairSample

COLUMNS = ("source", "target", "render", "background", "mask_source", "mask_target")


def preview_grid(samples: Iterable[PairSample], *, rows: int = 8, tile: int = 128) -> Image.Image:
    """One row per pair (up to ``rows``), one column per member, labelled with the sample key."""
    chosen = []
    for s in samples:
        chosen.append(s)
        if len(chosen) == rows:
            break
    if not chosen:
        raise ValueError("no samples to preview")
    label_h = 14
    grid = Image.new("RGB", (tile * len(COLUMNS), (tile + label_h) * len(chosen)), (24, 24, 24))
    draw = ImageDraw.Draw(grid)
    for r, s in enumerate(chosen):
        y = r * (tile + label_h)
        draw.text((2, y + 1), f"{s.key}  {' | '.join(COLUMNS)}", fill=(230, 230, 230))
        for c, name in enumerate(COLUMNS):
            a = np.asarray(getattr(s, name))
            img = Image.fromarray(a).convert("RGB").resize((tile, tile), Image.BILINEAR)
            grid.paste(img, (c * tile, y + label_h))
    return grid


def preview_png(samples: Iterable[PairSample], **kw) -> bytes:
    buf = io.BytesIO()
    preview_grid(samples, **kw).save(buf, format="PNG")
    return buf.getvalue()
