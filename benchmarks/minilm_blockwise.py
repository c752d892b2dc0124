"""Experiment: block-wise reconstruction (BRECQ-style) of a quantized MiniLM, as PTQ on its own and as
the starting point of QAT. Each encoder layer of the prepared student is fitted, in order, to the
float layer's output: its input is what the already-fitted student layers produce, its target the
float model's activations on the same sentences (``qat.reconstruct``). Then the held-out cosine is measured as in
``benchmarks/accuracy.py minilm``::

    python benchmarks/minilm_blockwise.py --bits W4A8 --iters 400 --lr 3e-5 --sentences 512

Prints the cosine after calibration (MSE ranges), after the reconstruction, and, with
``--distill-steps N``, after N further steps of ``qat.recipes.minilm.distill``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # accuracy.py takes it off again on import
from accuracy import MINILM_CONFIGS, minilm_plan, minilm_reconstruct, minilm_setup  # noqa: E402

from qat import prepare  # noqa: E402
from qat.ptq import calibrate  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", default="W4A8", choices=[c[0] for c in MINILM_CONFIGS])
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--scale-lr", type=float, default=1e-5)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="append a JSON line of the results to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qat.recipes.minilm import cosine_to, distill, embed

    t0 = time.time()
    name, wb, ab = next(c for c in MINILM_CONFIGS if c[0] == args.bits)
    setup = minilm_setup(args.device)
    teacher, tok, held, ref = setup.teacher, setup.tok, setup.held, setup.ref
    pool = setup.train + setup.wiki
    student = prepare(setup.fresh(), minilm_plan(name, wb, ab, "lsq_plus", "mse"))
    calibrate(student, setup.calib, forward_fn=lambda mod, b: mod(**b))
    res = {"bits": name, "args": vars(args), "cos_calibrated": cosine_to(ref, embed(student, tok, held))}
    print(f"{name} calibrated (MSE ranges): {res['cos_calibrated']:.5f}", flush=True)
    res["layer_mse"] = []
    if args.iters:
        res["layer_mse"] = minilm_reconstruct(student, setup, pool, args.sentences, args.iters, args.lr, args.scale_lr, args.batch)
        print("  per-layer mse to float: " + ", ".join(f"{e:.3e}" for e in res["layer_mse"]), flush=True)
    res["cos_reconstructed"] = cosine_to(ref, embed(student, tok, held))
    print(f"{name} block-wise reconstructed: {res['cos_reconstructed']:.5f}  ({time.time() - t0:.0f}s)", flush=True)
    if args.distill_steps:
        distill(student, teacher, tok, pool, steps=args.distill_steps, batch=16, max_length=64, lr=3e-5, layer_weight=10.0)
        res["cos_distilled"] = cosine_to(ref, embed(student, tok, held))
        print(f"{name} + {args.distill_steps} distillation steps: {res['cos_distilled']:.5f}  ({time.time() - t0:.0f}s)", flush=True)
    res["seconds"] = round(time.time() - t0, 1)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
