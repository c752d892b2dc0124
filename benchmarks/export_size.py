"""Converted model size vs the bit-count bound and the float model.

    python benchmarks/export_size.py

The bound: every quantized weight at exactly its bit-width (``numel * bits / 8`` bytes), plus what
the format must hold besides (scales at their stored dtype, zero points, input scales, biases,
norms and float layers as they are). "stored" is the converted model's ``state_dict`` in bytes;
"packed file" the safetensors file (tensors + header + JSON metadata). Writes
benchmarks/results/export_size.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

# Python puts a script's folder first on sys.path, and benchmarks/kernels.py would then shadow the
# ``kernels`` package that transformers imports when it is installed (ImportError: CUDAProperties):
# keep this folder off the path. Scripts that import a sibling (``from accuracy import ...``) do so first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch

from qat import convert, prepare
from qat.int_modules import IntModuleMixin
from qat.export import save_packed
from qat.size import float_size_bytes, model_size_bytes

HERE = os.path.dirname(os.path.abspath(__file__))


def sizes(name: str, make, plan: str, example) -> dict:
    float_bytes = float_size_bytes(make())
    model = prepare(make(), plan)
    with torch.no_grad():
        example(model)
    model.eval()
    estimate = model_size_bytes(model)
    int_model = convert(model)
    stored = bound = 0
    weight_bits = 0.0
    for key, t in int_model.state_dict().items():
        b = t.numel() * t.element_size()
        stored += b
        if key.endswith("qweight"):
            mod = int_model.get_submodule(key.rpartition(".")[0])
            assert isinstance(mod, IntModuleMixin)
            exact = torch.Size(mod.view_shape).numel() * mod.weight_spec.bits / 8
            bound += exact
            weight_bits += exact
        else:
            bound += b
    path = save_packed(int_model, os.path.join(tempfile.mkdtemp(), "m.safetensors"))
    return {
        "model": name, "plan": plan, "float_bytes": float_bytes, "stored_bytes": stored, "bit_bound_bytes": int(bound),
        "stored_over_bound": round(stored / bound, 4), "packed_file_bytes": os.path.getsize(path),
        "qat_size_estimate_bytes": estimate, "compression_vs_float": round(float_bytes / stored, 2),
    }


def main() -> None:
    from qat.recipes.digits import DigitsCNN

    rows = []
    for plan in ("w8a8", "w4a4", "w2a2"):
        rows.append(sizes("digits-cnn", DigitsCNN, plan, lambda m: m(torch.rand(64, 1, 8, 8))))
    try:
        from qat.recipes.minilm import load_minilm, tokenize

        _, tok = load_minilm()
        batch = tokenize(tok, ["A sentence to calibrate on.", "Another, somewhat longer, sentence for the observers."])
        for plan in ("w8a8", "gguf_q8_0", "gguf_q4_0"):
            rows.append(sizes("minilm", lambda: load_minilm()[0], plan, lambda m: m(**batch)))
    except ImportError as exc:
        print(f"MiniLM skipped: {exc}")
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "export_size.json"), "w") as f:
        json.dump(rows, f, indent=2)
    lines = ["# Converted size vs the bit-count bound", "", "`python benchmarks/export_size.py`", "",
             "| model | plan | float bytes | converted (state_dict) | bit-count bound | converted / bound | packed file | compression |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['plan']} | {r['float_bytes']} | {r['stored_bytes']} | {r['bit_bound_bytes']} | "
                     f"{r['stored_over_bound']} | {r['packed_file_bytes']} | {r['compression_vs_float']}x |")
    with open(os.path.join(HERE, "results", "export_size.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
