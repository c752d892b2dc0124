"""``benchmarks/accuracy.py minilm --merge``: one bit-width per call, one table."""

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "accuracy.py")


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("bench_accuracy", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _res(rows, seconds=10.0, **over):
    res = {"recipe": {"steps": 2}, "recipe_name": "best", "lr": {"W4": 1e-4}, "methods": ["ptq_rtn", "qat_lsq"],
           "seed": 0, "device": "CPU", "weights": "per-group 32, affine", "seconds": seconds,
           "rows": [{"bits": b, "qat_lsq": v} for b, v in rows]}
    res.update(over)
    return res


def test_merge_keeps_other_bit_widths_in_table_order(accuracy):
    earlier = _res([("W4A8 (g32)", 0.99), ("W8A8 (g32)", 0.5)], seconds=100.0)
    new = _res([("W8A8 (g32)", 0.999), ("W4A16 (g32)", 0.995)], seconds=50.0)
    merged = accuracy.merge_minilm(earlier, new)
    assert [r["bits"] for r in merged["rows"]] == ["W4A8 (g32)", "W4A16 (g32)", "W8A8 (g32)"]
    assert merged["rows"][2]["qat_lsq"] == 0.999  # the new run's row replaces the old one
    assert merged["seconds"] == 150.0


@pytest.mark.parametrize("key,value", [("recipe", {"steps": 3}), ("methods", ["ptq_rtn"]), ("device", "GPU")])
def test_merge_refuses_incomparable_runs(accuracy, key, value):
    with pytest.raises(ValueError, match=key):
        accuracy.merge_minilm(_res([("W4A8 (g32)", 0.99)]), _res([("W8A8 (g32)", 0.9)], **{key: value}))
