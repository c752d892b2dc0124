"""Issue 15, the CLI / recipe half: each reproduction of "Nothing silent, nothing lost" as a test."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import qat.recipes.export as export_mod
import qat.recipes.ptq as ptq_mod
import qat.recipes.train as train_mod
from qat import QATConfigError, load_plan, prepare
from qat.recipes.config import register_configs
from qat.recipes.digits import DigitsCNN

CONFIG_DIR = str(pathlib.Path(train_mod.__file__).resolve().parent.parent / "configs")
TINY = ["logger=none", "fp.epochs=1", "qat.epochs=1", "model.net.channels=4", "ptq.calibration_batches=1",
        "callbacks.qat.calibration_batches=1"]


def _compose(name, overrides):
    GlobalHydra.instance().clear()
    register_configs()
    ptq_mod.register_ptq_configs()
    export_mod.register_export_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def _cli(module, args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", f"qat.recipes.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


# ---------------------------------------------------------------- 1. values checked before training
@pytest.mark.parametrize(
    "override,match",
    [
        ("fp.epochs=-1", r"fp.epochs must be an integer >= 0, got -1"),
        ("qat.epochs=-1", r"qat.epochs must be an integer >= 0, got -1"),
        ("fp.lr=0", r"fp.lr must be a finite number > 0, got 0"),
        ("qat.lr=-0.1", r"qat.lr must be a finite number > 0"),
        ("qat.lr=nan", r"qat.lr must be a finite number > 0"),
        ("data.batch_size=0", r"data.batch_size must be an integer >= 1, got 0"),
        ("data.batch_size=abc", r"data.batch_size must be an integer >= 1, got 'abc'"),
        ("ptq.calibration_batches=0", r"ptq.calibration_batches must be an integer >= 1, got 0"),
        ("+trainer.max_epochs=1", r"trainer.max_epochs is set by the recipe per stage; set fp.epochs / qat.epochs"),
        ("+trainer.max_epoch=1", r"trainer.max_epoch is not a pytorch_lightning.Trainer argument"),
        ("quant.rules.0.weight.bits=1", r"bits must be in 2..16, got 1"),
        ("quant.rules.0.weight.axis=7", r"quant: layer '0' \(Conv2d\) weight: axis=7 out of range"),
        ("+quant.rules.0.input.percentile=150", r"percentile must be in \(50, 100\], got 150"),
    ],
)
def test_train_values_fail_before_any_training(tmp_path, monkeypatch, override, match):
    """fp.epochs=-1 trained forever; bits 1 / axis 7 failed only after the FP stage; batch_size=0 and
    +trainer.max_epochs=1 ended in raw tracebacks. Now: QATConfigError naming the key, nothing trained."""
    fits = []
    monkeypatch.setattr(train_mod, "build_trainer", lambda *a, **k: fits.append(a) or pytest.fail("trained"))
    cfg = _compose("train", [*TINY, override])
    with pytest.raises(QATConfigError, match=match):
        train_mod.run(cfg, str(tmp_path))
    assert not fits and not (tmp_path / "results.json").exists()


def test_group_size_5_fails_before_fp_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "build_trainer", lambda *a, **k: pytest.fail("trained"))
    cfg = _compose("train", [*TINY, "quant.rules.0.weight.granularity=per_group", "+quant.rules.0.weight.group_size=5"])
    with pytest.raises(QATConfigError, match=r"group_size=5 does not divide"):
        train_mod.run(cfg, str(tmp_path))


@pytest.mark.parametrize(
    "override,match",
    [
        ("qat.epochs=-1", r"qat.epochs must be an integer >= 0, got -1"),
        ("qat.lr=0", r"qat.lr must be a finite number > 0"),
        ("fp.epochs=-2", r"fp.epochs must be an integer >= 0"),
        ("ptq.calibration_batches=0", r"ptq.calibration_batches must be an integer >= 1, got 0"),
        ("data.batch_size=0", r"data.batch_size must be an integer >= 1"),
        ("+trainer.max_epochs=1", r"trainer.max_epochs is set by the recipe per stage"),
    ],
)
def test_ptq_values_fail_before_any_work(tmp_path, override, match):
    cfg = _compose("ptq", ["logger=none", "fp.epochs=1", "model.net.channels=4", override])
    with pytest.raises(QATConfigError, match=match):
        ptq_mod.run(cfg, str(tmp_path))
    assert not os.listdir(tmp_path)


def test_cli_max_epochs_collision_is_a_clear_error(tmp_path):
    proc = _cli("train", ["logger=none", "+trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert proc.returncode == 1
    assert "QATConfigError: trainer.max_epochs is set by the recipe per stage" in proc.stderr
    assert "Traceback" not in proc.stderr.split("QATConfigError")[-1]


# ---------------------------------------------------------------- 2. outputs that cannot collide
@pytest.mark.slow
def test_three_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    """The default run dir had a one-second resolution: it now has microseconds."""
    cmd = [sys.executable, "-m", "qat.recipes.train", "logger=none", "--cfg", "hydra", "--resolve"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    dirs = {next(l.strip() for l in out.splitlines() if l.strip().startswith("dir: outputs/")) for out in outs}
    assert len(dirs) == 3, dirs


def test_second_run_in_same_dir_is_refused(tmp_path):
    """Two runs in one directory overwrote each other's model and results; the second is refused
    before Hydra writes its .hydra/config.yaml there, and overwrite=true lets it through."""
    run = tmp_path / "run"
    args = [*TINY, "fp.epochs=0", "qat.epochs=0", f"hydra.run.dir={run}"]
    assert _cli("train", args, tmp_path).returncode == 0
    before = (run / "results.json").read_text(), (run / ".hydra" / "config.yaml").read_text()
    proc = _cli("train", [*args, "quant=w8a8"], tmp_path)
    assert proc.returncode == 1 and f"{run}/results.json already exists" in proc.stderr, proc.stderr[-2000:]
    assert ((run / "results.json").read_text(), (run / ".hydra" / "config.yaml").read_text()) == before
    proc = _cli("train", [*args, "quant=w8a8", "overwrite=true"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["plan"] == "w8a8"
    assert "w8a8" in (run / ".hydra" / "config.yaml").read_text()


def test_run_refuses_dir_with_results(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(QATConfigError, match="results.json already exists"):
        train_mod.run(_compose("train", TINY), str(tmp_path))
    with pytest.raises(QATConfigError, match="results.json already exists"):
        ptq_mod.run(_compose("ptq", ["logger=none"]), str(tmp_path))


def test_multirun_with_failed_job_summarises_and_ignores_stale(tmp_path):
    """One failed job wrote no summary though the others finished, and a reused sweep dir counted
    stale runs: the summary lists the failed job (status, error) beside the finished ones, and only
    this sweep's jobs."""
    sweep = tmp_path / "sweep"
    stale = sweep / "7_w2a2"
    stale.mkdir(parents=True)
    (stale / "results.json").write_text(json.dumps({"plan": "w2a2", "sweep_id": "old", "fp": {}, "ptq": {}, "qat": {}}))
    args = ["-m", *TINY, "fp.epochs=0", "qat.epochs=0", "quant=w8a8,w4a4", "quant.rules.0.weight.bits=8,1",
            f"hydra.sweep.dir={sweep}"]
    proc = _cli("train", args, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [(e["plan"], e["status"]) for e in summary] == [("w8a8", "finished"), ("w8a8", "failed"),
                                                          ("w4a4", "finished"), ("w4a4", "failed")]
    failed = [e for e in summary if e["status"] == "failed"]
    assert all("bits must be in 2..16, got 1" in e["error"] for e in failed)
    ids = {e["sweep_id"] for e in summary if e["status"] == "finished"}
    assert len(ids) == 1 and "old" not in ids
    assert "sweep summary (2 runs, 2 failed)" in proc.stdout and "FAILED job 1" in proc.stdout


def test_results_and_model_are_written_atomically(tmp_path, monkeypatch):
    """A crash while writing leaves the previous file whole and no temporary file behind."""
    from qat.recipes import atomic

    atomic.write_json({"old": 1}, str(tmp_path / "results.json"))

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.json, "dump", boom)
    with pytest.raises(OSError):
        atomic.write_json({"new": 1}, str(tmp_path / "results.json"))
    assert json.loads((tmp_path / "results.json").read_text()) == {"old": 1}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def _qat_checkpoint(tmp_path):
    torch.manual_seed(0)
    net = prepare(DigitsCNN(channels=4), "w8a8")
    net(torch.rand(16, 1, 8, 8))
    path = tmp_path / "qat_model.pt"
    torch.save({"plan": load_plan("w8a8").to_dict(), "state_dict": net.state_dict()}, path)
    return path


@pytest.mark.parametrize("shape,match", [("[1,1,5]", "does not fit the model"), ("[1,0,8,8]", "integers >= 1"),
                                         ("[1,a]", "integers >= 1")])
def test_export_wrong_example_input_shape_leaves_nothing(tmp_path, shape, match):
    ckpt = _qat_checkpoint(tmp_path)
    out = tmp_path / "out"
    cfg = _compose("export", [f"checkpoint={ckpt}", f"output_dir={out}", "model.net.channels=4",
                              f"example_input_shape={shape}"])
    with pytest.raises(QATConfigError, match=rf"example_input_shape.*{match}"):
        export_mod.run(cfg)
    assert not out.exists() or not os.listdir(out)


def test_export_failure_midway_leaves_no_half_written_files(tmp_path, monkeypatch):
    import qat.callbacks.export as cb_export

    ckpt = _qat_checkpoint(tmp_path)
    out = tmp_path / "out"

    def half_then_fail(int_model, formats, out_dir, *a, **k):
        (pathlib.Path(out_dir) / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("writer crashed")

    monkeypatch.setattr(cb_export, "export_formats", half_then_fail)
    cfg = _compose("export", [f"checkpoint={ckpt}", f"output_dir={out}", "model.net.channels=4"])
    with pytest.raises(RuntimeError, match="writer crashed"):
        export_mod.run(cfg)
    assert not os.listdir(out)


# ---------------------------------------------------------------- 4. truncated / empty checkpoints
@pytest.mark.parametrize("content", [b"", "truncated"])
def test_export_truncated_or_empty_checkpoint(tmp_path, content):
    ckpt = _qat_checkpoint(tmp_path)
    data = ckpt.read_bytes()
    ckpt.write_bytes(content if content == b"" else data[: len(data) // 2])
    with pytest.raises(QATConfigError, match=rf"checkpoint '{ckpt}' is not a PyTorch checkpoint"):
        export_mod.run(_compose("export", [f"checkpoint={ckpt}", "model.net.channels=4"]))


@pytest.mark.parametrize("content", ["empty", "truncated"])
def test_resume_from_truncated_or_empty_ckpt(tmp_path, content):
    cfg = _compose("train", TINY)
    train_mod.run(cfg, str(tmp_path))
    last = tmp_path / "checkpoints" / "qat" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(b"" if content == "empty" else data[: len(data) // 2])
    (tmp_path / "results.json").unlink()
    cfg = _compose("train", [*TINY, f"resume={tmp_path}"])
    with pytest.raises(QATConfigError, match=rf"resume: checkpoint '{last}' is (empty|truncated)"):
        train_mod.run(cfg, str(tmp_path))


def test_resume_errors(tmp_path):
    with pytest.raises(QATConfigError, match="no such run directory"):
        train_mod.run(_compose("train", [*TINY, f"resume={tmp_path}/nope"]))
    train_mod.run(_compose("train", TINY), str(tmp_path))
    with pytest.raises(QATConfigError, match=r"differs from the interrupted run's .* in \['qat'\]"):
        train_mod.run(_compose("train", [*TINY, "qat.epochs=3", f"resume={tmp_path}"]))


# ---------------------------------------------------------------- 3. crash safety: the kill test
KILL_ARGS = ["logger=none", "fp.epochs=1", "qat.epochs=3", "model.net.channels=4", "data.batch_size=16",
             "ptq.calibration_batches=1", "callbacks.qat.calibration_batches=1"]


def test_sigkill_during_qat_then_resume_equals_uninterrupted(tmp_path):
    """qat-train killed by SIGKILL partway through the QAT stage (after its first epoch's checkpoint),
    resumed with resume=<run dir>, ends with the very results and quantized state dict of an
    uninterrupted run (same seed, CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "qat.recipes.train", *KILL_ARGS]
    full = subprocess.run([*cmd, f"hydra.run.dir={tmp_path}/full"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, f"hydra.run.dir={run}"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = run / "checkpoints" / "qat" / "last.ckpt"
    deadline = time.time() + 240
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (run / "results.json").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["epoch"] < 2, "killed too late: the QAT stage had finished"
    fp_ckpt_mtime = (run / "fp_model.pt").stat().st_mtime

    resumed = subprocess.run([*cmd, f"resume={run}"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (run / "fp_model.pt").stat().st_mtime == fp_ckpt_mtime  # the finished FP stage was not retrained
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((run / "results.json").read_text())
    assert [a[k]["test_acc"] for k in ("fp", "ptq", "qat")] == [b[k]["test_acc"] for k in ("fp", "ptq", "qat")]
    sa = torch.load(tmp_path / "full" / "qat_model.pt", weights_only=True)["state_dict"]
    sb = torch.load(run / "qat_model.pt", weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
