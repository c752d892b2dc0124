"""Sweeps of qat-train (issue 18, deliverable 3): the job returns its objective so Hydra's Optuna
sweeper works, the float model is trained once a sweep and reused, the SLURM launcher config composes."""

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.train as train_mod
from qat.recipes.config import register_configs

CONFIG_DIR = str(pathlib.Path(train_mod.__file__).resolve().parent.parent / "configs")
TINY = ["logger=none", "fp.epochs=1", "qat.epochs=1", "model.net.channels=4", "data.batch_size=128", "ptq.calibration_batches=1",
        "callbacks.qat.calibration_batches=1"]


def _cli(args, cwd):
    proc = subprocess.run([sys.executable, "-m", "qat.recipes.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=400)
    return proc, proc.stdout + proc.stderr


def _compose(overrides, hydra_config=False):
    GlobalHydra.instance().clear()
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def test_optuna_sweep_of_two_trials_ends_with_its_best_value(tmp_path):
    """`qat-train -m hydra/sweeper=qat_optuna` trained every trial and then failed (the job returned
    None); now each trial returns its QAT test/acc, the sweep ends with the best one, and the float
    model is trained by the first trial only."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    proc, out = _cli(["-m", "hydra/sweeper=qat_optuna", "hydra.sweeper.n_trials=2", *TINY, f"hydra.sweep.dir={sweep}"],
                     tmp_path)
    assert proc.returncode == 0, out[-3000:]
    assert "Directions: ['maximize']" in out  # mode=max (test/acc) -> maximize
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert "Best value:" in out and f"Best value: {best['best_value']}" in out
    jobs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(jobs) == 2
    assert best["best_value"] == max(j["qat"]["test_acc"] for j in jobs)
    assert set(best["best_params"]) == {"qat.lr"} and 1e-4 <= best["best_params"]["qat.lr"] <= 1e-2
    assert [j["fp"]["source"] for j in jobs] == ["trained", "cache"]
    assert len(list((sweep / "fp_cache").glob("fp_*.pt"))) == 1


def test_multirun_trains_the_float_model_once_and_equals_fresh_runs(tmp_path):
    """The float model was retrained in every multirun job. A 2-job sweep trains it once (job 2 loads
    it from <sweep dir>/fp_cache), and job 2's results equal a single run of its config that trained
    its own float model: the cache keeps the random state after the float stage too."""
    sweep = tmp_path / "sweep"
    proc, out = _cli(["-m", "quant=w8a8,w4a4", *TINY, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, out[-3000:]
    assert out.count("fp_cache: the float model is kept in") == 1
    assert out.count("fp_cache: the float model comes from") == 1
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(r["plan"], r["fp"]["source"]) for r in summary] == [("w8a8", "trained"), ("w4a4", "cache")]
    assert summary[0]["fp"]["test_acc"] == summary[1]["fp"]["test_acc"]

    with contextlib.redirect_stdout(io.StringIO()):
        fresh = train_mod.run(_compose(["quant=w4a4", *TINY]), str(tmp_path / "fresh"))
    assert fresh["fp"]["source"] == "trained"
    cached = summary[1]
    assert [cached[k]["test_acc"] for k in ("fp", "ptq", "qat")] == [fresh[k]["test_acc"] for k in ("fp", "ptq", "qat")]


def test_fp_cache_key_and_a_damaged_entry(tmp_path):
    """A config that changes the float stage (fp.epochs) gets its own entry; a damaged entry is
    trained again and replaced, not trusted."""
    cache = tmp_path / "cache"
    cfg = _compose(["quant=w8a8", *TINY, f"fp_cache={cache}"])
    other = _compose(["quant=w8a8", *TINY, "fp.epochs=2"])
    assert train_mod.fp_cache_key(cfg) != train_mod.fp_cache_key(other)
    assert train_mod.fp_cache_key(cfg) == train_mod.fp_cache_key(_compose(["quant=w2a2", *TINY]))  # quant: not float
    entry = cache / f"fp_{train_mod.fp_cache_key(cfg)}.pt"
    cache.mkdir()
    entry.write_bytes(b"half a checkpoint")
    with contextlib.redirect_stdout(io.StringIO()):
        first = train_mod.run(cfg, str(tmp_path / "a"))  # fp_cache from the config (a directory)
        second = train_mod.run(cfg, str(tmp_path / "b"))
    assert (first["fp"]["source"], second["fp"]["source"]) == ("trained", "cache")
    assert first["qat"] == second["qat"] and entry.stat().st_size > 1000
    assert sorted(os.listdir(cache)) == [entry.name]  # written atomically: no temporary file left


def test_fp_cache_false_turns_it_off_and_bad_values_are_refused(tmp_path):
    from qat import QATConfigError

    proc, out = _cli(["-m", "quant=w8a8,w4a4", *TINY, "fp.epochs=0", "qat.epochs=0", "fp_cache=false",
                      f"hydra.sweep.dir={tmp_path}/sweep"], tmp_path)
    assert proc.returncode == 0, out[-3000:]
    assert not (tmp_path / "sweep" / "fp_cache").exists() and "fp_cache:" not in out
    with pytest.raises(QATConfigError, match=r"fp_cache must be null .*, false \(off\) or a directory, got 3"):
        train_mod.run(_compose([*TINY, "fp_cache=3"]), str(tmp_path / "x"))


def test_optuna_sweeper_direction_follows_mode():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from omegaconf import OmegaConf

    for mode, direction in (("max", "maximize"), ("min", "minimize")):
        cfg = _compose(["hydra/sweeper=qat_optuna", f"mode={mode}"], hydra_config=True)
        sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
        assert sweeper["direction"] == direction and sweeper["_target_"].endswith("OptunaSweeper")
        assert sweeper["params"] == {"qat.lr": "tag(log, interval(1e-4, 1e-2))"}


def test_slurm_launcher_config_composes():
    """hydra/launcher=slurm is submitit's SLURM launcher with the documented keys (not run: no SLURM here)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from omegaconf import OmegaConf

    cfg = _compose(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.sweep.dir=/shared/sweep"],
                   hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["gpus_per_node"] == 1 and launcher["timeout_min"] == 60
    assert OmegaConf.select(cfg, "hydra.launcher.submitit_folder") == "/shared/sweep/.submitit/%j"
