"""Per-pair scoring of edited images and aggregation into an EvalReport.

``PairScorer.score`` takes a batch of edited crops with their targets (the ground-truth frame whose attributes
drove the edit) and sources, and returns one record per pair: SSIM and LPIPS (edited vs target), identity
distance (edited vs source), APD/AED/ALD (edited fit vs target fit), and the Inception features of both images
for FID. A metric that cannot be computed for a pair is NaN and its reason is counted, never a crash.
``ReportBuilder`` folds records (from any number of workers) into the report.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from rigface.eval.attributes import FitMismatchError, attribute_distances
from rigface.eval.fid import FeatureStats, InceptionFeatures, fid_from_stats
from rigface.eval.identity import EmbeddingError, identity_distance
from rigface.eval.images import ImageFormatError, to_float_batch
from rigface.eval.lpips_net import LPIPS
from rigface.eval.report import COLUMNS, EvalReport
from rigface.eval.ssim import ssim_torch

log = logging.getLogger(__name__)

PER_PAIR = ("ssim", "lpips", "id_l2", "apd", "aed", "ald")


@dataclass
class PairScorer:
    """Holds the metric networks; ``embedder`` and ``analyzer`` are optional (their columns stay NaN without)."""

    lpips: LPIPS | None = None
    inception: InceptionFeatures | None = None
    embedder: Any = None  # .embed(crop) -> 1-D array
    analyzer: Any = None  # .analyze(img) -> FaceFit | FaceSkip
    device: str = "cpu"

    @classmethod
    def build(cls, *, lpips_net: str = "alex", lpips_weights=None, inception_path=None, face_cfg=None,
              with_face: bool = True, device: str | None = None) -> "PairScorer":
        """The networks of the report; the face backends come from rigface.face with ``face_cfg``."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        embedder = analyzer = None
        if with_face:
            from rigface.face import FaceAnalyzer, IdentityEmbedder

            embedder, analyzer = IdentityEmbedder(face_cfg), FaceAnalyzer(face_cfg)
        return cls(
            lpips=LPIPS.pretrained(lpips_net, lpips_weights).to(device),  # type: ignore[arg-type]
            inception=InceptionFeatures(inception_path, device=device),
            embedder=embedder, analyzer=analyzer, device=device,
        )

    @torch.inference_mode()
    def score(self, edited: Sequence[np.ndarray], target: Sequence[np.ndarray],
              source: Sequence[np.ndarray] | None = None, keys: Sequence[str] | None = None) -> list[dict]:
        n = len(edited)
        if len(target) != n or (source is not None and len(source) != n):
            raise ValueError(f"edited/target/source lengths differ: {n}, {len(target)}, {len(source or [])}")
        keys = list(keys) if keys is not None else [str(i) for i in range(n)]
        records = [{"key": k, **{m: math.nan for m in PER_PAIR}, "skips": []} for k in keys]
        try:
            e = to_float_batch(list(edited), self.device)
            t = to_float_batch(list(target), self.device)
        except (ImageFormatError, ValueError) as exc:
            for r in records:
                r["skips"].append("bad_image")
            log.warning("batch of %d pairs not scored: %s", n, exc)
            return records
        if e.shape != t.shape:
            # The model may generate at another resolution than the shard crops: compare at the target's size.
            e = torch.nn.functional.interpolate(e, size=t.shape[2:], mode="bicubic", align_corners=False).clamp(0, 1)
        ssim = ssim_torch(e, t).cpu().numpy()
        lp = self.lpips(e, t).cpu().numpy() if self.lpips is not None else np.full(n, np.nan)
        fe = self.inception(e).cpu().numpy() if self.inception is not None else None
        ft = self.inception(t).cpu().numpy() if self.inception is not None else None
        for i, r in enumerate(records):
            r["ssim"], r["lpips"] = float(ssim[i]), float(lp[i])
            if fe is not None:
                r["feat_edited"], r["feat_target"] = fe[i].astype(np.float32), ft[i].astype(np.float32)
            edited_u8 = _to_uint8(edited[i])
            if self.embedder is not None and source is not None:
                self._identity(r, edited_u8, _to_uint8(source[i]))
            if self.analyzer is not None:
                self._attributes(r, edited_u8, _to_uint8(target[i]))
        return records

    def _identity(self, r: dict, edited: np.ndarray, source: np.ndarray) -> None:
        try:
            r["id_l2"] = identity_distance(self.embedder.embed(edited), self.embedder.embed(source))
        except (EmbeddingError, ValueError) as exc:
            r["skips"].append("identity_failed")
            log.info("%s: identity not scored: %s", r["key"], exc)

    def _attributes(self, r: dict, edited: np.ndarray, target: np.ndarray) -> None:
        from rigface.face.types import FaceSkip

        fe, ft = self.analyzer.analyze(edited), self.analyzer.analyze(target)
        for role, fit in (("edited", fe), ("target", ft)):
            if isinstance(fit, FaceSkip):
                r["skips"].append(f"{role}_{fit.reason.value}")
                return
        try:
            r.update(attribute_distances(fe, ft))
        except FitMismatchError as exc:
            r["skips"].append("fit_mismatch")
            log.info("%s: attributes not scored: %s", r["key"], exc)


def _to_uint8(img) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return a


@dataclass
class ReportBuilder:
    """Sums per-pair records into means, FID statistics and skip counts; ``merge`` joins partial builders."""

    sums: dict[str, float] = field(default_factory=lambda: {m: 0.0 for m in PER_PAIR})
    counts: Counter = field(default_factory=Counter)
    skips: Counter = field(default_factory=Counter)
    samples: int = 0
    fid_edited: FeatureStats = field(default_factory=FeatureStats)
    fid_target: FeatureStats = field(default_factory=FeatureStats)

    def add(self, records: Iterable[dict]) -> "ReportBuilder":
        for r in records:
            self.samples += 1
            for m in PER_PAIR:
                v = r.get(m)
                if v is not None and math.isfinite(float(v)):
                    self.sums[m] += float(v)
                    self.counts[m] += 1
            for reason in r.get("skips") or ():
                self.skips[str(reason)] += 1
            if r.get("feat_edited") is not None and r.get("feat_target") is not None:
                self.fid_edited.update(np.asarray(r["feat_edited"])[None])
                self.fid_target.update(np.asarray(r["feat_target"])[None])
        return self

    def skip(self, reason: str, n: int = 1) -> None:
        """Pairs that never reached scoring (undecodable sample, failed edit)."""
        self.samples += n
        self.skips[reason] += n

    def build(self, info: dict | None = None) -> EvalReport:
        metrics: dict[str, float | None] = {k: None for k in COLUMNS}
        counts = {"samples": self.samples}
        for m in PER_PAIR:
            counts[m] = int(self.counts[m])
            if self.counts[m]:
                metrics[m] = self.sums[m] / self.counts[m]
        notes = []
        counts["fid"] = self.fid_edited.count
        if self.fid_edited.count >= 2:
            metrics["fid"] = fid_from_stats(self.fid_target, self.fid_edited)
        else:
            notes.append(f"FID needs at least 2 scored images; got {self.fid_edited.count}.")
        return EvalReport(metrics=metrics, counts=counts, skips=dict(self.skips), info=dict(info or {}), notes=notes)
