"""Pair-quality fields of meta.json["quality"] (computed by rigface.face.quality) and the filters on them that
training, `shards preview` and `shards report` share: ``field>=value`` / ``field<=value`` expressions."""

from __future__ import annotations

import json
import operator
import re
from typing import Any, Callable, Iterable, Mapping

QUALITY_FIELDS = ("score", "face_size", "sharpness", "landmark_confidence", "padded_fraction",
                  "pose_delta", "expression_delta", "lighting_delta")
# Higher is better for these; padded_fraction lower is better; the deltas measure the edit, not its quality.
HIGHER_IS_BETTER = {"score": True, "face_size": True, "sharpness": True, "landmark_confidence": True,
                    "padded_fraction": False}

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le, ">": operator.gt,
                                                   "<": operator.lt, "==": operator.eq}
_EXPR = re.compile(r"^\s*([a-z_]+)\s*(>=|<=|==|>|<)\s*([-+0-9.eEinf]+)\s*$")


class QualityFilterError(ValueError):
    pass


def parse_filter(expr: str) -> tuple[str, str, float]:
    m = _EXPR.match(expr)
    if not m:
        raise QualityFilterError(f"quality filter {expr!r}: expected FIELD>=VALUE (or <=, >, <, ==)")
    name, op, value = m.group(1), m.group(2), m.group(3)
    if name not in QUALITY_FIELDS:
        raise QualityFilterError(f"quality filter {expr!r}: unknown field {name!r}; one of {', '.join(QUALITY_FIELDS)}")
    try:
        return name, op, float(value)
    except ValueError:
        raise QualityFilterError(f"quality filter {expr!r}: {value!r} is not a number") from None


def quality_from_meta(meta: Mapping[str, Any] | bytes | str | None) -> dict[str, float] | None:
    """meta.json (dict or raw bytes) -> its quality dict, or None for shards written before quality fields."""
    if meta is None:
        return None
    if isinstance(meta, (bytes, str)):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    q = meta.get("quality") if isinstance(meta, Mapping) else None
    return dict(q) if isinstance(q, Mapping) else None


def make_predicate(min_quality: float | None = None, filters: Iterable[str] = ()) -> Callable[[Any], bool] | None:
    """A test meta -> keep? for `min_quality` (on `score`) and filter expressions; None when nothing filters.

    A pair whose meta has no quality fields (a dataset prepared before they existed) is kept: the filter
    cannot judge it, and dropping a whole old dataset silently would be worse.
    """
    rules = [parse_filter(f) for f in filters]
    if min_quality is not None:
        rules.append(("score", ">=", float(min_quality)))
    if not rules:
        return None

    def keep(meta: Any) -> bool:
        q = quality_from_meta(meta)
        if q is None:
            return True
        for name, op, value in rules:
            v = q.get(name)
            if v is None or not _OPS[op](float(v), value):
                return False
        return True

    return keep
