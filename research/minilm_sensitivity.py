"""Research: which of MiniLM's 36 encoder Linear layers carry the 4-bit weight error (CPU, ~1 minute).

Each layer alone gets the W4 per-group-32 affine weights of ``accuracy.py minilm`` (MSE-optimal
ranges, round to nearest, float activations); the row is the held-out embedding error
``1 - cosine`` to the float model that this one layer causes. The last line quantizes them all::

    python research/minilm_sensitivity.py        # -> research/results/minilm_sensitivity_cpu.md
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

#: the product benchmarks (``accuracy.py``'s MiniLM setup) live next door, in benchmarks/
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)  # accuracy.py takes it off again on import (see its comment)
from accuracy import MINILM_GROUP, minilm_setup  # noqa: E402

from qat import QuantPlan, prepare  # noqa: E402
from qat.sensitivity import layer_sensitivity  # noqa: E402
from qat.ptq import calibrate  # noqa: E402

KINDS = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense"]


def _plan(bits: int) -> QuantPlan:
    w = {"bits": bits, "granularity": "per_group", "group_size": MINILM_GROUP, "observer": "mse", "estimator": "ste",
         "symmetric": False}
    return QuantPlan.from_dict({"name": "w_only", "rules": [{"match": "encoder.*", "types": ["Linear"], "weight": w}]})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    from qat.recipes.minilm import cosine_to, embed

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    s = minilm_setup("cpu", wiki=False)
    n_layers = len(s.teacher.encoder.layer)

    plan = _plan(args.bits)
    fwd = lambda mod, b: mod(**b)  # noqa: E731
    # one layer at a time (qat.layer_sensitivity): the metric is the held-out cosine, 1 - it the error
    sens = {r.name: 1.0 - r.metric for r in layer_sensitivity(
        s.teacher, plan, s.calib, lambda m: cosine_to(s.ref, embed(m, s.tok, s.held)), forward_fn=fwd)}
    table = {k: [sens[f"encoder.layer.{i}.{k}"] for i in range(n_layers)] for k in KINDS}
    for k, v in table.items():
        print(k, " ".join(f"{e:.5f}" for e in v), flush=True)
    m = prepare(s.fresh(), plan)
    calibrate(m, s.calib, forward_fn=fwd)
    everything = 1.0 - cosine_to(s.ref, embed(m, s.tok, s.held))
    total = sum(sum(v) for v in table.values())
    lines = [f"# MiniLM: held-out embedding error (1 - cosine) from W{args.bits} g{MINILM_GROUP} weights on one layer at a time",
             "", f"CPU, torch {torch.__version__}; `python research/minilm_sensitivity.py`; affine groups, MSE-optimal ranges, "
             "round to nearest, float activations; 141 held-out Lee sentences.", "",
             "| layer | " + " | ".join(str(i) for i in range(n_layers)) + " | sum |",
             "|---|" + "---:|" * (n_layers + 1)]
    for k, v in table.items():
        lines.append(f"| {k} | " + " | ".join(f"{e:.5f}" for e in v) + f" | {sum(v):.5f} |")
    lines += ["", f"Sum over the 36 layers: {total:.5f}; all 36 quantized together: {everything:.5f}."]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "minilm_sensitivity_cpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
