"""benchmarks/kquant_llamacpp.py's verdict: a win beyond the run-to-run spread needs a spread (at
least 2 seeds), and the committed results are what the script writes from their own JSON."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _load():
    spec = importlib.util.spec_from_file_location("kquant_llamacpp_bench", ROOT / "benchmarks" / "kquant_llamacpp.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_a_win_beyond_the_spread_needs_two_seeds():
    bench = _load()
    assert bench.wins_beyond_spread([0.99], 0.5) is None  # one seed: no spread, no verdict
    assert bench.wins_beyond_spread([], 0.5) is None
    assert bench.wins_beyond_spread([0.990, 0.991, 0.992], 0.98) is True
    assert bench.wins_beyond_spread([0.990, 0.990], 0.98) is True  # 2 seeds that agree: a spread of 0, measured
    assert bench.wins_beyond_spread([0.990, 0.979], 0.98) is False  # a seed below llama.cpp
    assert bench.wins_beyond_spread([0.981, 0.989], 0.98) is False  # margin 0.005 under 2 std (0.0113)
    r = {"llama_cpp": {"cos": 0.97}, "llama_cpp_imatrix": {"cos": 0.98}, "qat": {"mean": 0.99, "runs": [0.99]}}
    v = bench.verdict(r)
    assert v["qat_wins_beyond_spread"] is None and v["qat_minus_best_llama_cpp"] == 0.01


def test_committed_results_are_what_the_script_writes_from_their_json(tmp_path):
    bench = _load()
    bench.main(["--from-json", str(RESULTS / "kquant_llamacpp.json"), "--out", str(tmp_path)])
    assert (tmp_path / "kquant_llamacpp.md").read_text() == (RESULTS / "kquant_llamacpp.md").read_text()
    res = json.loads((tmp_path / "kquant_llamacpp.json").read_text())
    assert res == json.loads((RESULTS / "kquant_llamacpp.json").read_text())
    for kind, r in res["types"].items():
        assert (r["qat_wins_beyond_spread"] is None) == (len(r["qat"]["runs"]) < 2), kind
    assert res["types"]["q3_k"]["qat_wins_beyond_spread"] and res["types"]["q4_k_m"]["qat_wins_beyond_spread"]
