"""Check that a compiled QAT training step computes the same gradients as eager, on every compile
route, for the decoder of ``train_step.py`` (a small configuration), on the device given.

    python benchmarks/compile_grad_check.py --device cuda --estimator lsq

Prints, per route, the largest gradient difference relative to the parameter's largest eager
gradient, parameters whose gradient is missing, and the aten::mm count of one compiled step.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
import torch._dynamo

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import train_step as ts  # noqa: E402

from qat.kernels import set_compile_route  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--estimator", default="lsq", choices=["lsq", "ste"])
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = ts.GPTConfig(n_layer=2, d=256, n_head=4, vocab=1024, ctx=128, batch=4, seq=128)
    (x, y), = ts.make_batches(cfg, 4, 128, 1, dev)
    grads = {}
    for tag, route, comp in (("eager", "inductor", False), ("inductor", "inductor", True), ("kernel", "kernel", True)):
        set_compile_route(route)
        torch._dynamo.reset()
        model, _ = ts.build_model(cfg, args.estimator, dev)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            model(x, y)
        fwd = torch.compile(model) if comp else model
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            fwd(x, y).backward()
        model.zero_grad(set_to_none=True)
        with torch.profiler.profile() as prof:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                fwd(x, y).backward()
        mm = sum(e.count for e in prof.key_averages() if e.key == "aten::mm")
        grads[tag] = {n: None if p.grad is None else p.grad.float().clone() for n, p in model.named_parameters()}
        print(f"{tag}: aten::mm x{mm}")
    for tag in ("inductor", "kernel"):
        worst, missing = 0.0, []
        for n, e in grads["eager"].items():
            g = grads[tag][n]
            if (e is None) != (g is None):
                missing.append(n)
            elif e is not None:
                worst = max(worst, ((e - g).abs().max() / e.abs().max().clamp_min(1e-12)).item())
        print(f"{tag}: worst relative grad difference {worst:.3g}; missing grads {missing}")


if __name__ == "__main__":
    main()
