"""The Table-1 style report: the paper's columns, how many pairs each value rests on, and what was skipped."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

# Column key -> (header, lower is better). Order is the paper's Table 1.
COLUMNS: dict[str, tuple[str, bool]] = {
    "id_l2": ("ID L2", True),
    "ssim": ("SSIM", False),
    "lpips": ("LPIPS", True),
    "fid": ("FID", True),
    "apd": ("APD", True),
    "aed": ("AED", True),
    "ald": ("ALD", True),
}
# Wei et al., Pattern Recognition 180 (2026) 114322, Table 1 (ArcFace, DECA, Deep3DFaceRecon, 512 px).
PAPER_ROW: dict[str, float] = {
    "id_l2": 0.356, "ssim": 0.850, "lpips": 0.063, "fid": 60.27, "apd": 0.026, "aed": 0.061, "ald": 0.053,
}
# Below this many images per set FID is strongly biased (2048-d features): flagged in the report.
FID_MIN_RELIABLE = 2048


@dataclass
class EvalReport:
    """Mean of each metric over the pairs it could be computed on (FID: over the whole set)."""

    metrics: dict[str, float | None] = field(default_factory=lambda: {k: None for k in COLUMNS})
    counts: dict[str, int] = field(default_factory=dict)  # metric -> pairs it rests on; plus 'samples'
    skips: dict[str, int] = field(default_factory=dict)  # reason -> count
    info: dict[str, Any] = field(default_factory=dict)  # model, data, steps, backends, timings ...
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        unknown = set(self.metrics) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown metric columns: {sorted(unknown)}")
        self.metrics = {k: self.metrics.get(k) for k in COLUMNS}

    @property
    def samples(self) -> int:
        return int(self.counts.get("samples", 0))

    def mlflow_metrics(self) -> dict[str, float]:
        """Finite values under 'eval/<column>' names, plus the counts."""
        out = {f"eval/{k}": float(v) for k, v in self.metrics.items() if v is not None and math.isfinite(v)}
        out.update({f"eval/count_{k}": float(v) for k, v in self.counts.items()})
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["columns"] = {k: h for k, (h, _) in COLUMNS.items()}
        d["paper"] = dict(PAPER_ROW)
        return d

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, default=_jsonable)

    @classmethod
    def from_json(cls, text: str) -> "EvalReport":
        d = json.loads(text)
        return cls(metrics=d["metrics"], counts=d.get("counts", {}), skips=d.get("skips", {}),
                   info=d.get("info", {}), notes=d.get("notes", []))

    def to_markdown(self, name: str = "this run") -> str:
        headers = ["", *(f"{h} {'↓' if low else '↑'}" for h, low in COLUMNS.values())]
        ours = [name, *(_fmt(k, self.metrics[k]) for k in COLUMNS)]
        paper = ["RigFace (paper, Table 1)", *(_fmt(k, PAPER_ROW[k]) for k in COLUMNS)]
        n = ["pairs", *(str(self.counts.get(k, 0)) for k in COLUMNS)]
        lines = ["# RigFace evaluation", "", _row(headers), _row(["---"] * len(headers)), _row(ours), _row(n),
                 _row(paper), ""]
        lines.append(f"Samples: {self.samples}. Skipped: {sum(self.skips.values())}"
                     + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skips.items())) + ")" if self.skips else "")
                     + ".")
        if self.info:
            lines += ["", "| setting | value |", "| --- | --- |"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in self.info.items()]
        notes = list(self.notes)
        if self.metrics["fid"] is not None and self.counts.get("fid", 0) < FID_MIN_RELIABLE:
            notes.append(f"FID on {self.counts.get('fid', 0)} images (< {FID_MIN_RELIABLE}) is biased upwards; "
                         "compare it only with FIDs on sets of the same size.")
        notes.append("APD/AED/ALD use the configured face backend; the paper used DECA and Deep3DFaceRecon, "
                     "so only same-backend numbers compare. ID L2 likewise depends on the identity network.")
        lines += ["", *(f"- {n}" for n in notes)]
        return "\n".join(lines) + "\n"


def _fmt(key: str, v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.2f}" if key == "fid" else f"{v:.3f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _cell(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=_jsonable)
    return str(text).replace("|", "\\|")


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
