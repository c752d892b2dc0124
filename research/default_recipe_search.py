"""Research: the search for ``qat-train``'s default recipe (issue 18, deliverable 5).

The default run's table must show the gap post-training quantization leaves and QAT closes, by more
than the run-to-run spread, on any machine, in under two minutes on two CPU cores. This script runs
``qat-train``'s own :func:`qat.recipes.train.run` (the same code path as the CLI, logger off) for a
list of candidate recipes (Hydra overrides of ``configs/train.yaml``) over several seeds, and writes
one row a run and a per-candidate summary: FP / PTQ / QAT test accuracy, mean and standard
deviation over the seeds, the gap QAT - PTQ with its spread, the share of PTQ's loss QAT recovers,
and the seconds a run takes::

    python research/default_recipe_search.py                       # every candidate, seeds 0-4 (~10 min)
    python research/default_recipe_search.py --only w3a3 w2a2 --seeds 0 1 2 3 4 5 6 7 8 9
    python research/default_recipe_search.py --only default --jobs 8   # on a machine with more cores

``--jobs N`` runs N seeds at once, each in its own process with ``--threads`` torch threads (default:
the cores divided by the jobs); seconds are only comparable to ``time qat-train`` with ``--jobs 1``
and two threads on two idle cores. ``--set NAME=override,override`` adds a candidate on the command
line. ``--device`` sets the trainer's ``accelerator`` (default ``cpu``). Results: ``--out`` (default
``research/results/default_recipe_search.md``) gets the summary and the per-seed tables of this
invocation's runs; ``--jsonl PATH`` also appends every run there as a JSON line. Every run is a
fresh process that imports ``qat`` from the checkout this script lives in.

What was measured and chosen (W2A4: PTQ ~55 %, QAT ~99 %, FP ~99.5 %) is in
``research/results/default_recipe.md``.

The seed is ``qat-train``'s ``seed``: it seeds the weights' initialization, the data split
(``data.seed: ${seed}``) and the shuffling, so the spread includes the choice of the 359 test images.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: candidate name -> overrides of configs/train.yaml. ``default`` is whatever train.yaml composes to now.
CANDIDATES: dict[str, list[str]] = {
    "default": [],
    "w4a4": ["quant=w4a4", "fp.epochs=15", "qat.epochs=10"],
    "w4a4_lsq": ["quant=w4a4_lsq", "fp.epochs=15", "qat.epochs=10"],
    "w3a3": ["quant=w3a3", "fp.epochs=15", "qat.epochs=10"],
    "w3a3_q15": ["quant=w3a3", "fp.epochs=15", "qat.epochs=15"],
    "w2a4": ["quant=w2a4", "fp.epochs=15", "qat.epochs=10"],
    "w2a4_q15": ["quant=w2a4", "fp.epochs=15", "qat.epochs=15"],
    "w2a2": ["quant=w2a2", "fp.epochs=15", "qat.epochs=10"],
    "w2a2_q15": ["quant=w2a2", "fp.epochs=15", "qat.epochs=15"],
    "w2a4_ptq_minmax": ["quant=w2a4", "fp.epochs=15", "qat.epochs=10", "ptq.observer=minmax"],  # PTQ with min/max ranges
    "w3a3_c16": ["quant=w3a3", "fp.epochs=15", "qat.epochs=10", "model.net.channels=16"],
    "w2a4_c16": ["quant=w2a4", "fp.epochs=15", "qat.epochs=10", "model.net.channels=16"],
    "w2a2_c16": ["quant=w2a2", "fp.epochs=15", "qat.epochs=10", "model.net.channels=16"],
}


def _use_this_checkout() -> None:
    """Import ``qat`` from the checkout this script lives in, even where an editable install of
    another checkout is on the path (its finder would map ``qat.kernels`` etc. there)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "__editable___lightning_qat" not in getattr(f, "__module__", "")]
    if sys.path[:1] != [ROOT]:
        sys.path.insert(0, ROOT)


def _run_one(name: str, overrides: list[str], seed: int, threads: int, device: str) -> dict[str, Any]:
    _use_this_checkout()
    import torch

    torch.set_num_threads(threads)
    logging.disable(logging.WARNING)  # Lightning's and the callback's INFO lines
    import warnings

    warnings.filterwarnings("ignore")
    from hydra import compose, initialize_config_module

    from qat.recipes.config import register_configs
    from qat.recipes.train import run

    register_configs()
    ovr = ["logger=none", *overrides, f"seed={seed}", f"trainer.accelerator={device}"]
    with initialize_config_module("qat.configs", version_base="1.3"):
        cfg = compose("train", ovr)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        res = run(cfg, out)
    field = str(res.get("metric", "test/acc")).replace("/", "_")  # results.json's key of the metric: test_acc
    return {
        "candidate": name, "overrides": overrides, "seed": seed, "plan": res["plan"],
        "fp_epochs": int(cfg.fp.epochs), "qat_epochs": int(cfg.qat.epochs),
        **{k: 100 * res[k][field] for k in ("fp", "ptq", "qat")},
        "seconds": round(time.time() - t0, 1), "threads": threads, "device": device,
        "torch": torch.__version__,
    }


def _ms(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.2f} ± {sd:.2f}"


def summarize(rows: list[dict[str, Any]]) -> str:
    """Markdown: a per-seed table and a per-candidate summary of ``rows`` (what :func:`_run_one` returns)."""
    names = list(dict.fromkeys(r["candidate"] for r in rows))
    out = ["## Summary (test accuracy %, mean ± sample std over the seeds; 1 test image = 0.28 points)", "",
           "| candidate | plan | epochs FP/QAT | seeds | FP | PTQ | QAT | gap QAT-PTQ | min gap | gap / std(gap) "
           "| recovered | s/run |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rs = sorted((r for r in rows if r["candidate"] == n), key=lambda r: r["seed"])
        fp, ptq, qat = ([r[k] for r in rs] for k in ("fp", "ptq", "qat"))
        gap = [q - p for q, p in zip(qat, ptq)]
        sd_gap = statistics.stdev(gap) if len(gap) > 1 else 0.0
        ratio = f"{statistics.mean(gap) / sd_gap:.1f}" if sd_gap > 0 else "inf"
        lost = statistics.mean(fp) - statistics.mean(ptq)
        rec = f"{100 * statistics.mean(gap) / lost:.0f}%" if lost > 0 else "-"
        out.append(
            f"| {n} | {rs[0]['plan']} | {rs[0]['fp_epochs']}/{rs[0]['qat_epochs']} | {len(rs)} | {_ms(fp)} | {_ms(ptq)} "
            f"| {_ms(qat)} | {_ms(gap)} | {min(gap):+.2f} | {ratio} | {rec} | {statistics.mean(r['seconds'] for r in rs):.1f} |"
        )
    out += ["", "## Per seed (FP / PTQ / QAT test accuracy %)", ""]
    for n in names:
        rs = sorted((r for r in rows if r["candidate"] == n), key=lambda r: r["seed"])
        out += [f"### {n}: `{' '.join(rs[0]['overrides']) or '(train.yaml defaults)'}`", "",
                "| seed | FP | PTQ | QAT | QAT - PTQ | s |", "|---|---|---|---|---|---|"]
        for r in rs:
            out.append(f"| {r['seed']} | {r['fp']:.2f} | {r['ptq']:.2f} | {r['qat']:.2f} | {r['qat'] - r['ptq']:+.2f} | {r['seconds']} |")
        fp, ptq, qat = ([r[k] for r in rs] for k in ("fp", "ptq", "qat"))
        out += [f"| mean ± std | {_ms(fp)} | {_ms(ptq)} | {_ms(qat)} | {_ms([q - p for q, p in zip(qat, ptq)])} | |", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", help="candidate names (default: all of CANDIDATES)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=OVR,OVR", help="one more candidate")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(ROOT, "research", "results", "default_recipe_search.md"))
    ap.add_argument("--jsonl", default=None, help="append every run here as a JSON line")
    args = ap.parse_args(argv)

    cands = dict(CANDIDATES)
    for s in args.set:
        name, _, ovr = s.partition("=")
        cands[name] = [o for o in ovr.split(",") if o]
    names = args.only if args.only else list(CANDIDATES)
    names += [s.partition("=")[0] for s in args.set if s.partition("=")[0] not in names]
    unknown = [n for n in names if n not in cands]
    if unknown:
        ap.error(f"unknown candidates {unknown}; known: {sorted(cands)}")
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    jobs = [(n, cands[n], s, threads, args.device) for n in names for s in args.seeds]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    rows: list[dict[str, Any]] = []
    # each run in a fresh process (spawn): what one qat-train command would compute, nothing carried over
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as ex:
        futures = [ex.submit(_run_one, *j) for j in jobs]
        for fut in futures:
            r = fut.result()
            rows.append(r)
            print(f"{r['candidate']:>12} seed {r['seed']}: FP {r['fp']:.2f} PTQ {r['ptq']:.2f} QAT {r['qat']:.2f} "
                  f"({r['seconds']} s)", flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
    md = summarize(rows)
    import platform

    import torch

    header = (f"# qat-train default recipe search\n\nCommand: `python research/default_recipe_search.py "
              f"{' '.join(argv if argv is not None else sys.argv[1:])}` ({args.device}, {threads} torch threads, "
              f"{args.jobs} job(s) at once; {os.cpu_count()} cores, {platform.machine()}, torch {torch.__version__})\n\n")
    with open(args.out, "w") as f:
        f.write(header + md + "\n")
    print(md)


if __name__ == "__main__":
    main()
