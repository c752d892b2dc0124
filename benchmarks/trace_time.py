"""Dynamo's trace time of the GPT decoder of ``train_step.py``, per row, on any device (the CPU will do):
the part of ``torch.compile``'s warm-up that the quantizers' Python adds. Each row runs in its own
process (a fresh Dynamo), traces the first forward with a backend that compiles nothing, and prints
seconds to trace and to build the guards.

    python benchmarks/trace_time.py                 # rows float, ste, lsq; the small (124M) config
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def one(row: str, n_layer: int, d: int) -> dict:
    import torch

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import train_step as ts

    cfg = ts.GPTConfig(n_layer=n_layer, d=d, n_head=max(1, d // 64), vocab=512, ctx=64)
    model, _ = ts.build_model(cfg, row, torch.device("cpu"))
    x, y = torch.randint(0, 512, (2, 64)), torch.randint(0, 512, (2, 64))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    if row != "float":  # calibrated first, as the callback and train_step do
        with torch.no_grad(), autocast:
            model(x, y)
    marks: dict = {}

    def backend(gm, example_inputs):
        marks["traced"] = time.perf_counter()

        def run(*args):
            marks.setdefault("guarded", time.perf_counter())
            return gm.forward(*args)

        return run

    fn = torch.compile(model, backend=backend)
    t0 = time.perf_counter()
    with autocast:
        fn(x, y)
    return {"row": row, "trace_s": round(marks["traced"] - t0, 2), "guards_s": round(marks["guarded"] - marks["traced"], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="float,ste,lsq")
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.n_layer, args.d)))
        return
    print(f"| row | Dynamo trace s | guards s |  (GPT n_layer={args.n_layer}, d={args.d}, 2 x 64 tokens)")
    print("|---|---:|---:|")
    for row in args.rows.split(","):
        out = subprocess.run([sys.executable, __file__, "--one", row, "--n-layer", str(args.n_layer), "--d", str(args.d)],
                             capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"| {r['row']} | {r['trace_s']} | {r['guards_s']} |", flush=True)


if __name__ == "__main__":
    main()
