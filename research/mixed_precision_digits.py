"""Research (issue 17): does the allocated mixed-precision plan beat the uniform plan of the same size
after QAT, on the digits CNN? (CPU, about 5 minutes with the defaults.)

For each seed: ``qat-train`` with the uniform plan at each budget's bit-width (it trains the float model,
kept in a per-seed ``fp_cache``); ``qat-sensitivity`` on that float model (``checkpoint=`` its
``fp_model.pt``) with candidates at fixed 4-bit inputs, so the allocation moves only weight bits between
layers; then ``qat-train`` with each allocated preset. Same float model, same QAT schedule, same
quantizer settings (the base plan ``w2a4``: LSQ, MSE-initialized ranges); only the per-layer bits differ.
The allocated plan's weight bits never exceed the uniform plan's (the table shows both sizes).

    python research/mixed_precision_digits.py          # -> research/results/mixed_precision_digits.{md,json}
    python research/mixed_precision_digits.py --seeds 0 1 2 3 4 --qat-epochs 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module("qat.configs", version_base="1.3"):
        cfg = compose(name, overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 4], help="average weight bits (integers: a uniform plan exists)")
    p.add_argument("--candidates", nargs="+", default=["w2a4", "w3a4", "w4a4", "w6a4", "w8a4"])
    p.add_argument("--method", default="measured", choices=["measured", "hessian"])
    p.add_argument("--qat-epochs", type=int, default=3, help="short QAT: at 10 epochs both plans reach the float accuracy")
    p.add_argument("--out", default=os.path.join(HERE, "results", "mixed_precision_digits"))
    args = p.parse_args(argv)

    import torch
    from omegaconf import OmegaConf

    from qat.recipes.config import register_configs
    from qat.recipes.sensitivity import register_sensitivity_configs, run as sensitivity_run
    from qat.recipes.train import run as train_run

    torch.set_num_threads(2)
    register_configs()
    register_sensitivity_configs()
    work = tempfile.mkdtemp(prefix="mp_digits_")
    common = ["logger=none", f"qat.epochs={args.qat_epochs}"]
    rows, t0 = [], time.time()
    for seed in args.seeds:
        cache = os.path.join(work, f"fp_cache_{seed}")

        def qat(plan_dict, tag):
            cfg = _compose("train", [*common, f"seed={seed}", f"fp_cache={cache}"])
            cfg.quant = OmegaConf.create(plan_dict)
            out = os.path.join(work, f"s{seed}_{tag}")
            with contextlib.redirect_stdout(io.StringIO()):
                return train_run(cfg, out), out

        from qat.recipes.sensitivity import uniform_plan

        uniform = {b: uniform_plan("w2a4", f"w{b}a4", f"w2a4_u_w{b}a4") for b in args.budgets}
        first = {}
        for b in args.budgets:
            first[b] = qat(uniform[b].to_dict(), f"u{b}")
        fp_model = os.path.join(first[args.budgets[0]][1], "fp_model.pt")
        scfg = _compose("sensitivity", ["logger=none", f"seed={seed}", f"checkpoint={fp_model}", "sensitivity.cache=false",
                                        f"sensitivity.method={args.method}",
                                        f"sensitivity.candidates=[{','.join(args.candidates)}]",
                                        f"budgets=[{','.join(str(b) for b in args.budgets)}]"])
        with contextlib.redirect_stdout(io.StringIO()):
            sens = sensitivity_run(scfg, os.path.join(work, f"s{seed}_sens"))
        for b in args.budgets:
            name = f"w2a4_mp_{b}"
            from qat import load_plan

            alloc = load_plan(sens["presets"][name])
            res_a, _ = qat(alloc.to_dict(), f"mp{b}")
            res_u = first[b][0]
            row = next(r for r in sens["rows"] if r["plan"] == name)
            rows.append({"seed": seed, "budget": b, "allocated_bits": row["bits"], "allocated_avg_bits": row["avg_bits"],
                         "fp": res_u["fp"]["test_acc"],
                         "uniform": {"ptq": res_u["ptq"]["test_acc"], "qat": res_u["qat"]["test_acc"], "bytes": res_u["qat"]["bytes"]},
                         "allocated": {"ptq": res_a["ptq"]["test_acc"], "qat": res_a["qat"]["test_acc"], "bytes": res_a["qat"]["bytes"]}})
            r = rows[-1]
            print(f"seed {seed} budget {b}: uniform QAT {r['uniform']['qat']:.4f} ({r['uniform']['bytes']} B), allocated QAT "
                  f"{r['allocated']['qat']:.4f} ({r['allocated']['bytes']} B) {row['bits']}", flush=True)
    seconds = round(time.time() - t0)
    result = {"args": vars(args), "rows": rows, "seconds": seconds, "torch": torch.__version__}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(_markdown(result))
    print(open(args.out + ".md").read())


def _markdown(result) -> str:
    a = result["args"]
    lines = [
        "# Allocated vs uniform plans of the same size after QAT: digits CNN", "",
        f"CPU (2 threads), torch {result['torch']}; `python research/mixed_precision_digits.py "
        f"--seeds {' '.join(map(str, a['seeds']))} --qat-epochs {a['qat_epochs']} --method {a['method']}` ({result['seconds']} s). "
        f"Base plan w2a4 (LSQ, MSE ranges); candidates {a['candidates']} (inputs 4-bit in every plan); sensitivity "
        f"`{a['method']}` on 4 training batches of the float model; fp 15 epochs, QAT {a['qat_epochs']} epochs; test accuracy (%) "
        "on the 360 test images (one image = 0.28 points).", "",
        "| budget (avg weight bits) | seed | uniform size (B) | allocated size (B) | uniform PTQ | allocated PTQ | uniform QAT | allocated QAT | QAT gain (pts) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        u, al = r["uniform"], r["allocated"]
        lines.append(f"| {r['budget']} | {r['seed']} | {u['bytes']} | {al['bytes']} | {100 * u['ptq']:.2f} | {100 * al['ptq']:.2f} | "
                     f"{100 * u['qat']:.2f} | {100 * al['qat']:.2f} | {100 * (al['qat'] - u['qat']):+.2f} |")
    lines += ["", "| budget | mean uniform QAT | mean allocated QAT | mean gain (pts) | seeds allocated > / = / < uniform |",
              "|---:|---:|---:|---:|---|"]
    for b in a["budgets"]:
        rs = [r for r in result["rows"] if r["budget"] == b]
        gains = [100 * (r["allocated"]["qat"] - r["uniform"]["qat"]) for r in rs]
        lines.append(f"| {b} | {100 * statistics.mean(r['uniform']['qat'] for r in rs):.2f} | "
                     f"{100 * statistics.mean(r['allocated']['qat'] for r in rs):.2f} | {statistics.mean(gains):+.2f} | "
                     f"{sum(g > 0 for g in gains)} / {sum(g == 0 for g in gains)} / {sum(g < 0 for g in gains)} |")
    lines += ["", "Allocated bits per layer (seed, budget):", ""]
    for r in result["rows"]:
        lines.append(f"- seed {r['seed']}, {r['budget']} bits (avg {r['allocated_avg_bits']:.3f}): {r['allocated_bits']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
