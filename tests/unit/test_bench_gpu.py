"""bench/gpu.py's code runs end to end on the CPU (`--smoke`: tiny shapes), so a GPU run does not fail on a typo."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.slow
def test_gpu_bench_smoke_prints_every_table(capsys, one_thread):
    sys.path.insert(0, str(BENCH))
    try:
        import gpu
    finally:
        sys.path.remove(str(BENCH))
    assert gpu.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    for title in ("training, tiny", "VAE every step", "cached latents", "peak memory per rank", "estimated per rank",
                  "edit, 1 UniPC steps, fp32", "edit, 1 UniPC steps, bf16", "bisenet 64 px", "deca 64 px",
                  "deep3d 64 px", "scrfd"):
        assert title in out, title
    assert "failed" not in out  # the 8-bit optimizer row ran too
