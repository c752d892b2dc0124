"""What the callbacks send to W&B (offline), TensorBoard and CSV, read back from what each wrote:
the plan and per-layer bits as hyperparameters, telemetry histograms, a figure, the model artifact."""

import glob
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import yaml  # noqa: E402
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger  # noqa: E402

from qat.callbacks import QuantizationAwareTraining, QuantizationTelemetry, QuantizedExport  # noqa: E402
from qat.callbacks.loggers import log_figure, logger_kind  # noqa: E402
from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule  # noqa: E402


@pytest.fixture()
def wandb_env(tmp_path, monkeypatch):
    for var, val in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)), ("WANDB_CACHE_DIR", str(tmp_path / "cache")),
                     ("WANDB_DATA_DIR", str(tmp_path / "data")), ("WANDB_SILENT", "true")):
        monkeypatch.setenv(var, val)
    return tmp_path


def test_plan_histograms_figure_and_artifact_reach_every_logger(wandb_env):
    tmp = wandb_env
    csv = CSVLogger(str(tmp / "csv"), name="run")
    tb = TensorBoardLogger(str(tmp / "tb"), name="run")
    wb = WandbLogger(project="qat-test", save_dir=str(tmp), offline=True, group="digits", job_type="qat")
    assert [logger_kind(lg) for lg in (csv, tb, wb)] == ["csv", "tensorboard", "wandb"]
    trainer = pl.Trainer(
        max_steps=2, logger=[csv, tb, wb], enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp),
        callbacks=[QuantizationAwareTraining("w4a8", module_attr="net"),
                   QuantizationTelemetry(every_n_steps=1, module_attr="net"),
                   QuantizedExport(str(tmp / "export"), formats=["safetensors"], module_attr="net")],
    )
    trainer.fit(ClassifierModule(DigitsCNN(channels=4)), DigitsDataModule())
    fig, ax = plt.subplots()
    ax.plot([1, 2], [3, 4])
    pngs = log_figure(trainer.loggers, "qat/pareto", fig, step=2)
    for lg in trainer.loggers:
        lg.save()
    run_dir = wb.experiment.dir
    wb.experiment.finish()

    # CSV: hparams.yaml and the histograms' summaries in metrics.csv; the figure as a PNG
    hp = yaml.safe_load(open(os.path.join(csv.log_dir, "hparams.yaml")))
    assert hp["qat/plan"] == "w4a8" and hp["qat/bits/0/weight"] == 4 and hp["qat/bits/0/input"] == 8
    assert 0 < hp["qat/avg_weight_bits"] <= 8
    header = open(os.path.join(csv.log_dir, "metrics.csv")).readline()
    assert "qat/0/weight/codes/mean" in header and "qat/0/weight/scale/max" in header
    assert os.path.join(csv.log_dir, "qat_pareto.png") in pngs and os.path.getsize(os.path.join(csv.log_dir, "qat_pareto.png")) > 0

    # TensorBoard: histograms and the figure in the event file, the plan in hparams.yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "qat/0/weight/codes" in tags["histograms"] and "qat/0/input/scale" in tags["histograms"]
    assert "qat/pareto" in tags["images"]
    assert "qat/0/weight/sqnr_db" in tags["scalars"]
    assert yaml.safe_load(open(os.path.join(tb.log_dir, "hparams.yaml")))["qat/plan"] == "w4a8"

    # W&B offline: the run's records hold the config keys, histograms and the model artifact; the image file
    records = open(glob.glob(os.path.join(os.path.dirname(run_dir), "run-*.wandb"))[0], "rb").read()
    for needle in (b"qat/plan", b"qat/bits/0/weight", b"qat/0/weight/codes", b"histogram", b"model-quantized",
                   b"model.safetensors", b"digits", b"qat/pareto"):
        assert needle in records, needle
    assert glob.glob(os.path.join(run_dir, "media", "images", "qat", "pareto*.png"))


def test_bad_flags_raise():
    from qat import QATConfigError

    with pytest.raises(QATConfigError, match="log_plan"):
        QuantizationAwareTraining("w4a8", log_plan="yes")
    with pytest.raises(QATConfigError, match="histograms"):
        QuantizationTelemetry(histograms=1)
    with pytest.raises(QATConfigError, match="log_artifact"):
        QuantizedExport("x", formats=["safetensors"], log_artifact=None)
