"""benchmarks/train_step.py end to end on the CPU: a tiny decoder, float and STE rows, eager mode,
through ``qat.prepare`` and through a Lightning ``Trainer`` with the QAT callback."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("train_step_bench", ROOT / "benchmarks" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_tiny_cpu_run_writes_rows_and_columns(tmp_path):
    bench = _load()
    doc = bench.main([
        "--device", "cpu", "--model", "tiny", "--steps", "2", "--warmup", "2", "--modes", "eager",
        "--rows", "float,ste", "--via", "prepare,trainer", "--profile-steps", "1", "--out", str(tmp_path), "--tag", "cpu",
    ])
    saved = json.loads((tmp_path / "train_step_cpu.json").read_text())
    assert saved["results"] == json.loads(json.dumps(doc["results"], default=str))
    got = {(r["via"], r["mode"], r["row"]) for r in saved["results"]}
    assert got == {(v, "eager", r) for v in ("prepare", "trainer") for r in ("float", "ste")}
    for r in saved["results"]:
        assert r["ok"], r.get("traceback")
        for col in ("step_ms", "step_ms_min", "step_ms_p90", "warmup_s", "first_step_s", "host_ms", "cpu_ms", "params"):
            assert isinstance(r[col], (int, float)) and r[col] >= 0, (col, r)
        assert len(r["step_ms_all"]) == 2
        assert r["retied_head"] is False  # prepare keeps the LM head tied to the embedding
        if r["row"] == "ste":
            assert r["backend"] == "reference"  # CPU tensors always run the reference ops
            assert r["params_trained"] == r["params"]  # STE: no learned quantizer parameters
    prof = [r for r in saved["results"] if r["via"] == "prepare"]
    assert all(r["prof_steps"] == 1 and r["prof_cpu_ms"] > 0 for r in prof)
    env = saved["env"]
    for key in ("torch", "gpu", "date", "python"):
        assert env[key]
    assert saved["commands"][0].startswith("python benchmarks/train_step.py")
    md = (tmp_path / "train_step_cpu.md").read_text()
    assert "## Step time, via prepare" in md and "## Step time, via trainer" in md
    assert "ours, STE weights" in md and "x float" in md


def test_merge_and_ratios(tmp_path):
    bench = _load()
    base = {"model": "small", "batch": 16, "seq": 1024, "via": "prepare", "ok": True, "step_ms_min": 1.0, "step_ms_p90": 1.0,
            "warmup_s": 1.0, "first_step_s": 1.0, "host_ms": 1.0, "cpu_ms": 1.0, "params": 124e6}
    a = {"env": {"gpu": "NVIDIA H200"}, "commands": ["cmd a"], "results": [
        {**base, "mode": "eager", "row": "float", "step_ms": 50.0, "peak_mem_gib": 10.0},
        {**base, "mode": "eager", "row": "ste", "step_ms": 75.0, "peak_mem_gib": 10.5}]}
    b = {"env": {"gpu": "NVIDIA H200"}, "commands": ["cmd b"], "results": [
        {**base, "mode": "cudagraphs", "row": "float", "step_ms": 40.0},
        {**base, "mode": "cudagraphs", "row": "torchao", "ok": False, "note": "torchao not importable"}]}
    for name, d in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(d))
    doc = bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path), "--tag", "m"])
    assert doc["commands"] == ["cmd a", "cmd b"] and len(doc["results"]) == 4
    md = (tmp_path / "train_step_m.md").read_text()
    assert "75.0 ms (1.50x)" in md and "1.05x" in md and "torchao not importable" in md
    assert bench.gpu_tag({"gpu": "NVIDIA H200"}) == "h200" and bench.gpu_tag({"gpu": "NVIDIA H100 80GB HBM3"}) == "h100"


def test_bad_arguments():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--model", "tiny", "--rows", "float,nope"])
    with pytest.raises(SystemExit):
        bench.main(["--device", "cpu", "--model", "tiny", "--warmup", "1"])
