"""The sharded momentum encoder on 2 real deepspeed CPU ranks, ZeRO-2, fp32 and bf16."""

from __future__ import annotations

import json

import pytest
from distributed import deepspeed_cmd, run


@pytest.mark.slow
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.extended), "bf16"])  # CI: bf16
def test_sharded_ema_equals_unsharded_reference(tmp_path, precision) -> None:
    out = tmp_path / "result.json"
    proc = run(deepspeed_cmd("tests/dist_scripts/ema_check.py", precision, str(out)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert len(results) == 2
    for r in results:
        assert r["applied"] == [True, True, True, False, True, True]  # the NaN step was skipped
        assert r["exact"] and r["max_err"] == 0.0, r
        assert r["keys"] and r["target_match"] and r["frozen_match"]
        assert r["layout_match"]  # sharded_ema.zero2_layout computes DeepSpeed's layout exactly
        assert r["ema_differs_from_online"]
        # each rank holds half of the encoder's fp32 EMA (plus at most a little padding)
        assert r["encoder_fp32_bytes"] / 2 <= r["local_bytes"] <= r["encoder_fp32_bytes"] / 2 + 64
