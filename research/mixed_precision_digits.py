"""Research (issue 17): does the allocated mixed-precision plan beat the uniform plan of the same size
after QAT, on the digits CNN? (CPU, 2 threads: about 2 minutes a seed with the defaults.)

For each seed: ``qat-train`` with the uniform plan at every bit-width next to a budget (it trains the
float model, kept in a per-seed ``fp_cache``); ``qat-sensitivity`` on that float model
(``checkpoint=`` its ``fp_model.pt``) with candidates at fixed 4-bit inputs, so the allocation moves
only weight bits between layers; then ``qat-train`` with each allocated preset. Same float model, same
QAT schedule, same quantizer settings (the base plan ``w2a4``: LSQ, MSE-initialized ranges); only the
per-layer bits differ. An allocation's weight bits never exceed its budget. An integer budget has a
uniform plan of the same size; a fractional one (2.5) is compared with the uniform plans on either
side (smaller and larger).

    python research/mixed_precision_digits.py            # -> benchmarks/results/mixed_precision_digits.{md,json}
    python research/mixed_precision_digits.py --seeds 3 4 --merge   # more seeds into the same result
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "mixed_precision_digits")


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module("qat.configs", version_base="1.3"):
        cfg = compose(name, overrides)
    OmegaConf.set_struct(cfg, False)
    return cfg


def _label(b: float) -> str:
    return f"{b:g}".replace(".", "p")  # as qat-sensitivity names its presets: 2.5 -> w2a4_mp_2p5


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[2.5, 3, 4], help="average weight bits")
    p.add_argument("--candidates", nargs="+", default=["w2a4", "w3a4", "w4a4", "w6a4", "w8a4"])
    p.add_argument("--method", default="measured", choices=["measured", "hessian"])
    p.add_argument("--qat-epochs", type=int, default=3, help="short QAT: at 10 epochs both plans reach the float accuracy")
    p.add_argument("--channels", type=int, default=32, help="the CNN's width (configs/model/digits_cnn.yaml: 32)")
    p.add_argument("--out", default=OUT)
    p.add_argument("--merge", action="store_true", help="keep the rows of the existing result (other seeds); same settings")
    args = p.parse_args(argv)

    import torch

    from qat import load_plan
    from qat.recipes.config import register_configs
    from qat.recipes.sensitivity import register_sensitivity_configs, run as sensitivity_run, uniform_plan
    from qat.recipes.train import run as train_run

    torch.set_num_threads(2)
    register_configs()
    register_sensitivity_configs()
    work = tempfile.mkdtemp(prefix="mp_digits_")
    common = ["logger=none", f"qat.epochs={args.qat_epochs}", f"model.net.channels={args.channels}"]
    widths = sorted({w for b in args.budgets for w in (math.floor(b), math.ceil(b))})
    rows, t0 = [], time.time()
    for seed in args.seeds:
        cache = os.path.join(work, f"fp_cache_{seed}")

        def qat(plan_dict, tag):
            cfg = _compose("train", [*common, f"seed={seed}", f"fp_cache={cache}"])
            cfg.quant = plan_dict
            out = os.path.join(work, f"s{seed}_{tag}")
            with contextlib.redirect_stdout(io.StringIO()):
                res = train_run(cfg, out)
            return {"ptq": res["ptq"]["test_acc"], "qat": res["qat"]["test_acc"], "bytes": res["qat"]["bytes"],
                    "fp": res["fp"]["test_acc"]}, out

        uniform, fp_model = {}, None
        for w in widths:
            uniform[w], out = qat(uniform_plan("w2a4", f"w{w}a4", f"w2a4_u_w{w}a4").to_dict(), f"u{w}")
            fp_model = fp_model or os.path.join(out, "fp_model.pt")
        scfg = _compose("sensitivity", ["logger=none", f"seed={seed}", f"checkpoint={fp_model}", "sensitivity.cache=false",
                                        f"model.net.channels={args.channels}", f"sensitivity.method={args.method}",
                                        f"sensitivity.candidates=[{','.join(args.candidates)}]",
                                        f"budgets=[{','.join(f'{b:g}' for b in args.budgets)}]"])
        with contextlib.redirect_stdout(io.StringIO()):
            sens = sensitivity_run(scfg, os.path.join(work, f"s{seed}_sens"))
        for b in args.budgets:
            name = f"w2a4_mp_{_label(b)}"
            alloc, _ = qat(load_plan(sens["presets"][name]).to_dict(), f"mp{_label(b)}")  # the preset file as written
            row = next(r for r in sens["rows"] if r["plan"] == name)
            alloc.update(avg_bits=row["avg_bits"], predicted_damage=row["predicted_damage"])
            rows.append({"seed": seed, "budget": b, "allocated_bits": row["bits"], "fp": alloc["fp"], "allocated": alloc,
                         "uniform_below": uniform[math.floor(b)], "uniform_above": uniform[math.ceil(b)],
                         "below": math.floor(b), "above": math.ceil(b)})
            u = rows[-1]["uniform_below" if b == math.floor(b) else "uniform_above"]
            print(f"seed {seed} budget {b:g}: uniform w{math.ceil(b)} QAT {u['qat']:.4f} ({u['bytes']} B), allocated QAT "
                  f"{alloc['qat']:.4f} ({alloc['bytes']} B) {row['bits']}", flush=True)
    import pytorch_lightning

    command = "python research/mixed_precision_digits.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    run = {"command": command.strip(), "seconds": round(time.time() - t0),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    result = {"args": {k: v for k, v in vars(args).items() if k not in ("out", "merge", "seeds")}, "rows": rows,
              "runs": [run], "versions": {"torch": torch.__version__, "pytorch_lightning": pytorch_lightning.__version__,
                                          "python": platform.python_version()}}
    if args.merge and os.path.isfile(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        if old["args"] != result["args"]:
            raise SystemExit(f"--merge: settings differ from the existing result's {old['args']}")
        new = {r["seed"] for r in rows}
        result["rows"] = sorted([r for r in old["rows"] if r["seed"] not in new] + rows, key=lambda r: (r["budget"], r["seed"]))
        result["runs"] = old["runs"] + [run]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(result) -> str:
    """The result as the committed Markdown tables."""
    a = result["args"]
    runs = "; ".join(f"`{r['command']}` ({r['seconds']} s, {r['date']})" for r in result["runs"])
    lines = [
        "# Allocated vs uniform plans of the same size after QAT: digits CNN", "",
        f"CPU (2 threads, shared), " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ". "
        f"Digits CNN ({a['channels']} channels); base plan w2a4 (LSQ, MSE ranges, 4-bit inputs in every plan); candidates "
        f"{a['candidates']}; sensitivity `{a['method']}` (loss increase on 4 training batches of the float model); fp 15 "
        f"epochs, QAT {a['qat_epochs']} epochs from the same float model and seed for every plan; test accuracy (%) on the "
        "360 test images (one image = 0.28 points). Sizes: bytes of the quantized model (weights at their bits, scales, "
        "float biases).", "", f"Commands: {runs}.", "",
        "| budget (avg weight bits) | seed | uniform plan | uniform size (B) | allocated size (B) | uniform PTQ | allocated PTQ "
        "| uniform QAT | allocated QAT | QAT gain (pts) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        al = r["allocated"]
        for side in ("below", "above") if r["below"] != r["above"] else ("below",):
            u = r[f"uniform_{side}"]
            lines.append(f"| {r['budget']:g} | {r['seed']} | w{r[side]}a4 | {u['bytes']} | {al['bytes']} | {100 * u['ptq']:.2f} | "
                         f"{100 * al['ptq']:.2f} | {100 * u['qat']:.2f} | {100 * al['qat']:.2f} | "
                         f"{100 * (al['qat'] - u['qat']):+.2f} |")
    lines += ["", "| budget | against | seeds | mean uniform QAT | mean allocated QAT | mean gain (pts) | "
              "seeds allocated > / = / < uniform |", "|---:|---|---:|---:|---:|---:|---|"]
    for b in sorted({r["budget"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["budget"] == b]
        for side in ("below", "above") if rs[0]["below"] != rs[0]["above"] else ("below",):
            gains = [100 * (r["allocated"]["qat"] - r[f"uniform_{side}"]["qat"]) for r in rs]
            what = f"w{rs[0][side]}a4" + ("" if rs[0]["below"] == rs[0]["above"] else
                                          (" (smaller)" if side == "below" else " (larger)"))
            lines.append(f"| {b:g} | {what} | {len(rs)} | {100 * statistics.mean(r[f'uniform_{side}']['qat'] for r in rs):.2f} | "
                         f"{100 * statistics.mean(r['allocated']['qat'] for r in rs):.2f} | {statistics.mean(gains):+.2f} | "
                         f"{sum(g > 0 for g in gains)} / {sum(g == 0 for g in gains)} / {sum(g < 0 for g in gains)} |")
    fp = [r["fp"] for r in result["rows"]]
    lines += ["", f"Float model: mean {100 * statistics.mean(fp):.2f} % over the seeds.", "",
              "Allocated bits per layer (seed, budget):", ""]
    for r in result["rows"]:
        lines.append(f"- seed {r['seed']}, {r['budget']:g} bits (avg {r['allocated']['avg_bits']:.3f}): {r['allocated_bits']}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
