"""`rigface shards report`: histograms of the pair-quality fields and the worst and best pairs, as PNG + JSON."""

from __future__ import annotations

import heapq
import io
import json
from typing import Any, Iterable, Mapping

import numpy as np
from PIL import Image, ImageDraw

from rigface.data import storage
from rigface.data.preview import _meta_of, preview_png
from rigface.data.quality import QUALITY_FIELDS, quality_from_meta
from rigface.data.schema import decode_sample


def histograms_png(values: Mapping[str, list[float]], bins: int = 24, panel: tuple[int, int] = (300, 150)) -> bytes:
    """One bar histogram per field, drawn with PIL (no plotting library needed on a data node)."""
    fields = [f for f in QUALITY_FIELDS if values.get(f)]
    cols = 4
    rows = max(1, -(-len(fields) // cols))
    pw, ph = panel
    img = Image.new("RGB", (pw * cols, ph * rows), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for n, name in enumerate(fields):
        v = np.asarray(values[name], np.float64)
        x0, y0 = (n % cols) * pw, (n // cols) * ph
        lo, hi = float(v.min()), float(v.max())
        counts, _ = np.histogram(v, bins=bins, range=(lo, hi if hi > lo else lo + 1e-9))
        top = max(1, int(counts.max()))
        plot_w, plot_h, left, base = pw - 20, ph - 44, x0 + 10, y0 + ph - 22
        bw = plot_w / bins
        for i, c in enumerate(counts):
            h = plot_h * c / top
            draw.rectangle([left + i * bw, base - h, left + (i + 1) * bw - 1, base], fill=(70, 110, 180))
        draw.line([left, base, left + plot_w, base], fill=(0, 0, 0))
        draw.text((x0 + 10, y0 + 4), f"{name}  n={v.size}  median {np.median(v):.3g}", fill=(0, 0, 0))
        draw.text((left, base + 4), f"{lo:.3g}", fill=(60, 60, 60))
        draw.text((left + plot_w - 40, base + 4), f"{hi:.3g}", fill=(60, 60, 60))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def quality_report(raws: Iterable[Mapping[str, Any]], out_dir: str, *, n: int = 8, by: str = "score",
                   tile: int = 128) -> dict[str, Any]:
    """Scan every sample once (meta only; `n` worst and `n` best kept whole) and write into `out_dir`:
    histograms.png, worst.png, best.png (pairs ranked by the quality field `by`) and report.json."""
    if by not in QUALITY_FIELDS:
        raise ValueError(f"unknown quality field {by!r}; one of {', '.join(QUALITY_FIELDS)}")
    values: dict[str, list[float]] = {f: [] for f in QUALITY_FIELDS}
    worst: list[tuple[float, int, Mapping[str, Any]]] = []
    best: list[tuple[float, int, Mapping[str, Any]]] = []
    total = without = 0
    for i, raw in enumerate(raws):
        total += 1
        q = quality_from_meta(_meta_of(raw))
        if q is None:
            without += 1
            continue
        for f in QUALITY_FIELDS:
            if q.get(f) is not None:
                values[f].append(float(q[f]))
        v = q.get(by)
        if v is None:
            continue
        for heap, item in ((worst, (-float(v), -i, raw)), (best, (float(v), -i, raw))):
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
    if total == 0:
        raise ValueError("no samples to report on")
    summary: dict[str, Any] = {"samples": total, "without_quality": without, "ranked_by": by, "fields": {}}
    for f, v in values.items():
        if v:
            a = np.asarray(v)
            p = np.percentile(a, [0, 10, 50, 90, 100])
            summary["fields"][f] = {"count": int(a.size), "mean": round(float(a.mean()), 4),
                                    **{k: round(float(x), 4) for k, x in zip(("min", "p10", "p50", "p90", "max"), p)}}
    written = {}
    if any(values.values()):
        storage.write_bytes(storage.join(out_dir, "histograms.png"), histograms_png(values))
        written["histograms"] = "histograms.png"
    for name, heap in (("worst", worst), ("best", best)):
        if heap:
            ordered = [raw for *_, raw in sorted(heap, key=lambda t: t[:2], reverse=True)]
            storage.write_bytes(storage.join(out_dir, f"{name}.png"),
                                preview_png((decode_sample(r) for r in ordered), rows=len(ordered), tile=tile))
            written[name] = f"{name}.png"
            summary[name] = [r["__key__"] for r in ordered]
    summary["files"] = written
    storage.write_bytes(storage.join(out_dir, "report.json"), json.dumps(summary, indent=1).encode())
    return summary
