"""benchmarks/weight_formats.py on its tiny preset, without Apple's code: every weight format of both families is
timed against our float32 sampler, lands near it, and the JSON file holds what was printed."""

from __future__ import annotations

import json

import pytest
from test_benchmarks import benchmark

weight_formats = benchmark("weight_formats")


def test_every_weight_format_of_both_families_is_timed_and_lands_near_float32(tmp_path):
    path = tmp_path / "results.json"
    results = weight_formats.main(
        ["--preset", "tiny", "--repeats", "2", "--threads", "1", "--compile-mode", "default", "--json", str(path)]
    )
    assert json.loads(path.read_text()) == json.loads(json.dumps(results))
    for family in ("tarflow", "starflow"):
        assert results[f"{family}_deviations_from"] == "float32"  # no Apple checkout given
        for name in ("float32", "bf16", "int8"):
            assert results[f"{family}_{name}_compile_seconds"] > 0
        for name in ("bf16", "int8", "int4", "float32_compiled", "bf16_compiled", "int8_compiled"):
            assert results[f"{family}_{name}_seconds"] > 0
            assert results[f"{family}_{name}_speedup_over_float32"] > 0
            assert len(results[f"{family}_{name}_speedup_over_float32_per_round"].split(", ")) == 2
            if name != "float32_compiled":
                assert 0 < results[f"{family}_{name}_max_abs_deviation"] < 0.2, (family, name)
        # Compiled float32 steps change only the summation order: float32 rounding, not a weight format's.
        assert results[f"{family}_float32_compiled_max_abs_deviation"] < 1e-4


def test_an_unknown_family_is_one_line():
    with pytest.raises(SystemExit, match="--families 'tarflow,dit': give some of tarflow, starflow"):
        weight_formats.main(["--preset", "tiny", "--families", "tarflow,dit"])
