"""A grid PNG of training pairs: source, target, render, background and the two masks per row; the pairs can
be filtered and sorted by their quality fields (meta.json["quality"])."""

from __future__ import annotations

import heapq
import io
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
from PIL import Image, ImageDraw

from rigface.data.quality import QUALITY_FIELDS, make_predicate, parse_filter, quality_from_meta
from rigface.data.schema import PairSample, decode_sample

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
        q = quality_from_meta(s.meta) or {}
        shown = "  ".join(f"{k[:5]} {q[k]:.3g}" for k in ("score", "sharpness", "face_size", "padded_fraction",
                                                          "pose_delta") if q.get(k) is not None)
        draw.text((2, y + 1), f"{s.key}  {shown or ' | '.join(COLUMNS)}", fill=(230, 230, 230))
        for c, name in enumerate(COLUMNS):
            a = np.asarray(getattr(s, name))
            img = Image.fromarray(a).convert("RGB").resize((tile, tile), Image.BILINEAR)
            grid.paste(img, (c * tile, y + label_h))
    return grid


def preview_png(samples: Iterable[PairSample], **kw) -> bytes:
    buf = io.BytesIO()
    preview_grid(samples, **kw).save(buf, format="PNG")
    return buf.getvalue()


def select_samples(raws: Iterable[Mapping[str, Any]], *, rows: int, sort: str | None = None,
                   where: Iterable[str] = ()) -> list[PairSample]:
    """Up to `rows` samples (raw webdataset dicts in, decoded out) passing the `where` filters, ordered by the
    quality field `sort` ("-field" for descending). Only `rows` samples are kept in memory while scanning."""
    keep = make_predicate(None, list(where))
    if sort is None:
        out = []
        for raw in raws:
            if keep is None or keep(_meta_of(raw)):
                out.append(decode_sample(raw))
                if len(out) == rows:
                    break
        return out
    desc = sort.startswith("-")
    name = sort.lstrip("-")
    if name not in QUALITY_FIELDS:
        parse_filter(f"{name}>=0")  # raises the error that names the known fields
    heap: list[tuple[float, int, Mapping[str, Any]]] = []
    for i, raw in enumerate(raws):
        meta = _meta_of(raw)
        if keep is not None and not keep(meta):
            continue
        v = (quality_from_meta(meta) or {}).get(name)
        if v is None:
            continue
        item = (float(v) if desc else -float(v), -i, raw)  # a min-heap of the `rows` best so far
        if len(heap) < rows:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)
    ordered = sorted(heap, key=lambda t: t[:2], reverse=True)
    return [decode_sample(raw) for *_, raw in ordered]


def _meta_of(raw: Mapping[str, Any]) -> Any:
    return raw.get("meta.json", raw.get(".meta.json"))


def iter_decoded(raws: Iterable[Mapping[str, Any]]) -> Iterator[PairSample]:
    for raw in raws:
        yield decode_sample(raw)
