"""The float-format kernels (``kernels/csrc/microscaling.cu``) on a GPU: parity with the reference,
then speed against the same-run copy of the bytes they must move.

One command, on a CUDA GPU::

    python benchmarks/microscaling_kernels.py     # writes benchmarks/results/microscaling_<gpu>.{md,json}

For each format (MXFP4, MXFP8, NVFP4, FP8 E4M3 per tensor / per channel) and dtype, on a (4096, 16384)
tensor (64M elements):

* ``parity``: the forward values, the packed mask and the backward (STE; learned scale: ``dx`` bit for
  bit, ``dscale`` to 1e-5 relative) equal the PyTorch reference on a (257, 4096) tensor holding NaN,
  infinities and a zero block; a failure is printed and makes the exit status 1;
* ``fwd+bwd``: the kernels' median time, straight-through (``mx_forward`` then ``fq_backward`` on its
  mask) and learned scale (``mx_forward`` then ``mx_lsq_backward``);
* ``copy``: a device-to-device copy of the fewest bytes the pair moves (x read and y written forward;
  grad read and dx written backward, plus the 1-bit mask written and read, or x read again for the
  learned backward), timed in the same run (``benchmarks/kernels.py``'s ``copy_time``); ``ratio`` the
  kernels over it (issue 16 asks for at most 1.10).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path

import torch

from qat.kernels import cupy_backend, reference
from qat.microscaling import MICRO_FORMATS, float_scale

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("qat_bench_kernels", _HERE / "kernels.py")
_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_kernels)
bench, copy_time = _kernels.bench, _kernels.copy_time

CASES = {  # name -> (format, axis)
    "mxfp4": ("mxfp4", None),
    "mxfp8": ("mxfp8", None),
    "nvfp4": ("nvfp4", None),
    "fp8_e4m3/tensor": ("fp8_e4m3", None),
    "fp8_e4m3/channel0": ("fp8_e4m3", 0),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _args(fmt: str, x: torch.Tensor, axis):
    f = MICRO_FORMATS[fmt]
    scale = None if f.block_scale == "e8m0" else float_scale(x.float(), fmt, axis)
    return f.element, f.block_size, f.block_scale, scale, axis


def _parity(fmt: str, axis, dtype) -> list[str]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(257, 4096, generator=g) * 10.0 ** torch.randint(-4, 4, (257, 4096), generator=g).float()
    x[0, :32] = 0.0
    x[1, 5], x[2, 7], x[3, 9] = float("nan"), float("inf"), -float("inf")
    x = x.to(dtype)
    element, bs, kind, scale, ax = _args(fmt, x, axis)
    errors = []
    y_ref, m_ref = reference.microscaling_forward(x, element, bs, kind, scale, ax)
    sd = None if scale is None else scale.cuda()
    y, m = cupy_backend.microscaling_forward(x.cuda(), element, bs, kind, sd, ax)
    same = torch.equal(torch.isnan(y.cpu()), torch.isnan(y_ref)) and torch.equal(
        torch.nan_to_num(y.cpu().float()).view(torch.int32), torch.nan_to_num(y_ref.float()).view(torch.int32))
    if not same:
        errors.append("forward values")
    if not torch.equal(m.cpu(), m_ref):
        errors.append("mask")
    grad = torch.randn(x.shape, generator=g).to(dtype)
    if not torch.equal(cupy_backend.fake_quantize_backward(grad.cuda(), m).cpu(), reference.fake_quantize_backward(grad, m_ref)):
        errors.append("STE backward")
    if scale is not None:
        dx_ref, ds_ref = reference.microscaling_lsq_backward(grad, x, element, bs, kind, scale, ax, 0.5)
        dx, ds = cupy_backend.microscaling_lsq_backward(grad.cuda(), x.cuda(), element, bs, kind, sd, ax, 0.5)
        if not torch.equal(dx.cpu(), dx_ref):
            errors.append("learned dx")
        if not torch.allclose(ds.cpu(), ds_ref, rtol=1e-5, atol=1e-6 * float(ds_ref.abs().max()) + 1e-30):
            errors.append(f"learned dscale (max rel {float(((ds.cpu() - ds_ref).abs() / ds_ref.abs().clamp_min(1e-30)).max()):.2e})")
    return errors


def _speed(fmt: str, axis, dtype, shape=(4096, 16384)) -> dict:
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    grad = torch.randn(shape, device="cuda").to(dtype)
    element, bs, kind, scale, ax = _args(fmt, x, axis)
    n, esize = x.numel(), x.element_size()

    def ste():
        _, mask = cupy_backend.microscaling_forward(x, element, bs, kind, scale, ax)
        cupy_backend.fake_quantize_backward(grad, mask)

    row = {"format": fmt, "axis": axis, "dtype": str(dtype).split(".")[-1], "numel": n}
    row["ste_us"] = bench(ste)
    row["ste_bytes"] = 4 * n * esize + 2 * (n // 8)
    row["ste_copy_us"] = copy_time(row["ste_bytes"])
    if scale is not None:

        def lsq():
            cupy_backend.microscaling_forward(x, element, bs, kind, scale, ax)
            cupy_backend.microscaling_lsq_backward(grad, x, element, bs, kind, scale, ax, 0.5)

        row["lsq_us"] = bench(lsq)
        row["lsq_bytes"] = 5 * n * esize
        row["lsq_copy_us"] = copy_time(row["lsq_bytes"])
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(_HERE / "results"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not cupy_backend.available():
        print("needs a CUDA GPU and CuPy", file=sys.stderr)
        return 2
    failures, rows = [], []
    for name, (fmt, axis) in CASES.items():
        for dname, dtype in DTYPES.items():
            errs = _parity(fmt, axis, dtype)
            if errs:
                failures.append(f"{name}/{dname}: {', '.join(errs)}")
            row = _speed(fmt, axis, dtype)
            row["case"], row["parity"] = name, not errs
            rows.append(row)
    lines = ["| case | dtype | parity | STE fwd+bwd (us) | copy (us) | ratio | learned fwd+bwd (us) | copy (us) | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lsq = (f"{r['lsq_us']:.0f} | {r['lsq_copy_us']:.0f} | {r['lsq_us'] / r['lsq_copy_us']:.2f}" if "lsq_us" in r
               else "- | - | -")
        lines.append(f"| {r['case']} | {r['dtype']} | {'yes' if r['parity'] else 'NO'} | {r['ste_us']:.0f} | "
                     f"{r['ste_copy_us']:.0f} | {r['ste_us'] / r['ste_copy_us']:.2f} | {lsq} |")
    table = "\n".join(lines)
    print(table)
    for f in failures:
        print("PARITY FAILURE:", f, file=sys.stderr)
    if not args.no_write:
        gpu = torch.cuda.get_device_name().replace(" ", "_")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version()}
        (out / f"microscaling_{gpu}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / f"microscaling_{gpu}.md").write_text(f"# Float-format kernels on {meta['gpu']}\n\n{table}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
