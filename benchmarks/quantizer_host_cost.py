"""Host (CPU) cost of one fake-quantizer call on a GPU, as a training step pays it per layer.

    python benchmarks/quantizer_host_cost.py --label after --json out.json   # time this checkout
    python benchmarks/quantizer_host_cost.py --render out.json               # the table of all labels

Each case calls a :class:`qat.fake_quant.FakeQuantizer` built from the issue's plan on a small CUDA
tensor (the kernels take a few microseconds, so the GPU keeps up and the wall time per call is the
host's), forward alone and forward + backward, N calls between two synchronizations. Cases:
``act``: int8 asymmetric dynamic per-token input, bf16 ``(2, 64, 768)``; ``w_ste``: int4 symmetric
per-group-128 weight with its min/max observer, float32 ``(768, 768)``; ``w_lsq``: the same with a
learned scale. Run it once per code version (``--label``) into one JSON to compare them.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import time

import torch

CASES = {
    "act": (dict(bits=8, signed=False, symmetric=False, granularity="per_token", dynamic=True), (2, 64, 768), torch.bfloat16, True),
    "w_ste": (dict(bits=4, symmetric=True, granularity="per_group", group_size=128), (768, 768), torch.float32, False),
    "w_lsq": (dict(bits=4, symmetric=True, granularity="per_group", group_size=128, estimator="lsq"), (768, 768), torch.float32, False),
}


def _time_us(fn, n: int, repeats: int = 7) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def measure(n: int) -> dict:
    from qat import QuantSpec
    from qat.fake_quant import FakeQuantizer

    out = {}
    for name, (spec_kw, shape, dtype, activation) in CASES.items():
        spec = QuantSpec(**spec_kw)
        fq = FakeQuantizer(spec, shape[-1:] if activation else shape, track_history=activation).cuda()
        x = (torch.randn(shape, device="cuda") * 2).to(dtype).requires_grad_()
        g = torch.ones(shape, device="cuda", dtype=dtype)
        fq(x)  # first call: kernels compiled, learned scales initialized

        def fwd():
            with torch.no_grad():
                fq(x)

        def fwd_bwd():
            fq(x).backward(g)

        out[name] = {"fwd_us": _time_us(fwd, n), "fwd_bwd_us": _time_us(fwd_bwd, n)}
    return out


def render(docs: list[dict]) -> str:
    head = docs[0]
    lines = [f"# Host cost of one fake-quantizer call, {head['gpu']}, torch {head['torch']}, {head['date']}", "",
             "Wall time per call over N calls between two synchronizations, tensors small enough that the GPU keeps up "
             "(so it is the host's time); median of 7.", "",
             "| case | " + " | ".join(f"{d['label']} ({d['git']}) fwd / fwd+bwd us" for d in docs) + " |",
             "|---|" + "---:|" * len(docs)]
    for case in CASES:
        cells = [f"{d['cases'][case]['fwd_us']:.0f} / {d['cases'][case]['fwd_bwd_us']:.0f}" for d in docs]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    lines += ["", "Cases: " + "; ".join(f"`{k}` {v[0]} on {v[2]} {v[1]}" for k, v in CASES.items()), "",
              "Command: `python benchmarks/quantizer_host_cost.py --label L --json F` per version, then `--render F`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--label", default="this checkout")
    p.add_argument("--json", default=None, help="append this run to a JSON list (created if missing)")
    p.add_argument("--render", default=None, help="print the table of a JSON list and stop")
    p.add_argument("--out", default=None, help="also write the table here (with --render)")
    p.add_argument("-n", type=int, default=300, help="calls between synchronizations")
    p.add_argument("--tuning", nargs="*", default=[], metavar="FIELD=VALUE",
                   help="KernelTuning fields for this run (e.g. param_block=False: launches through CuPy's argument conversion)")
    a = p.parse_args()
    if a.render:
        text = render(json.loads(pathlib.Path(a.render).read_text()))
        print(text)
        if a.out:
            pathlib.Path(a.out).write_text(text)
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the host cost of the CUDA path)")
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        git = "?"
    import qat

    from qat.kernels.cupy_backend import use_tuning
    from qat.kernels.tuning import tuning_from

    try:
        tuning = tuning_from(a.tuning)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    changes = tuning.changes()
    with use_tuning(tuning):
        cases = measure(a.n)
    doc = {"label": a.label, "git": git, "qat": str(pathlib.Path(qat.__file__).parent), "gpu": torch.cuda.get_device_name(),
           "torch": torch.__version__, "date": datetime.datetime.now().isoformat(timespec="seconds"), "tuning": changes,
           "cases": cases}
    print(json.dumps(doc, indent=1))
    if a.json:
        path = pathlib.Path(a.json)
        docs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(docs + [doc], indent=1))


if __name__ == "__main__":
    main()
