"""The sharded momentum encoder on 2 real deepspeed CPU ranks, ZeRO-2, fp32 and bf16."""

from __future__ import annotations

import json

import pytest
from distributed import check_engine_facts, deepspeed_cmd, run


@pytest.mark.slow
@pytest.mark.parametrize("precision", [pytest.param("fp32", marks=pytest.mark.extended), "bf16"])  # CI: bf16
def test_sharded_ema_equals_unsharded_reference(tmp_path, precision) -> None:
    out, facts_out = tmp_path / "result.json", tmp_path / "engine_facts.json"
    facts_arg = [str(facts_out)] if precision == "bf16" else []  # engine_facts.py is bf16
    proc = run(deepspeed_cmd("tests/dist_scripts/ema_check.py", precision, str(out), *facts_arg))
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
    if precision == "bf16":
        # tests/dist_scripts/engine_facts.py, which the GPU run starts (tests/test_gpu.py), on these
        # CPU ranks: its first run is here, not on the device, and its facts hold here too
        facts = json.loads(facts_out.read_text())
        assert facts["device"] == "cpu" and facts["world_size"] == 2, facts
        check_engine_facts(facts)
