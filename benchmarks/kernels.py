"""Benchmark of the fused CuPy fake-quant kernels against the memory-bandwidth ceiling and PyTorch.

One command, on a CUDA GPU::

    python benchmarks/kernels.py            # writes benchmarks/results/kernels_<gpu>.{md,json}

For every op x dtype x granularity on 64M elements (a (4096, 16384) tensor), forward + backward:

* ``ours``: the CuPy kernels (``qat.kernels.cupy_backend``), median time (``triton.testing.do_bench``,
  CUDA events; a plain event loop when Triton is missing);
* ``bytes``: the fewest bytes the op must move (each input read once, each output written once:
  x, y, grad, dx, the 1-bit mask, the parameters and their gradients);
* ``copy``: a same-run device-to-device copy moving those bytes (read + write), the ceiling;
  ``ours/copy`` is the gap to it (1.00 = at the ceiling);
* ``torch``: PyTorch's own op (``torch.fake_quantize_per_{tensor,channel}_affine``,
  ``torch._fake_quantize_learnable_per_{tensor,channel}_affine``; per-group as per-channel on a
  ``(-1, group)`` view), and ``compile``: ``torch.compile`` of the eager formula (round / clamp with
  a detach straight-through estimator), each with the speed-up of ours over it;
* the observer's min/max (``aminmax``) against PyTorch's reductions;
* the memory the STE forward keeps for backward, in bits per element (``torch.cuda.memory_allocated``).

Options: ``--numel``, ``--out DIR``, ``--no-compile`` (skip the torch.compile baselines);
for tuning: ``--only PATTERN[,PATTERN]`` (``op/dtype/granularity`` globs, e.g. ``lsq/*/group128``),
``--quick`` (kernel times and the copy only; prints, writes nothing), ``--set FIELD=VALUE`` (a field of
:class:`qat.kernels.tuning.KernelTuning` for the whole run, e.g. ``cols_rows_minmax=4`` or
``tile_lsq=(2,2,2)``; repeatable) and ``--sweep 'FIELD=VALUE ...'`` (with ``--quick``: one run per such
configuration, each a ``dataclasses.replace`` of the run's tuning passed to the kernels; compile-time
fields recompile the sources). Nothing in the backend is patched: every configuration is a
``KernelTuning`` handed to the backend functions (``tuning=``), or installed with
``cupy_backend.use_tuning`` around the public ops.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from qat.kernels import cupy_backend, fake_quantize, reference
from qat.kernels.tuning import DEFAULT_TUNING, KernelTuning
from qat.kernels.tuning import tuning_from as parse_tuning

GRANULARITIES = {
    "tensor": dict(axis=None, group_size=None),
    "channel0": dict(axis=0, group_size=None),
    "channel1": dict(axis=1, group_size=None),
    "group128": dict(axis=None, group_size=128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QMIN, QMAX = -8, 7  # signed int4


# ----------------------------------------------------------------------------- timing


def bench(fn) -> float:
    """Median time of ``fn`` in microseconds."""
    try:
        from triton.testing import do_bench

        return 1000.0 * do_bench(fn, warmup=25, rep=150, return_mode="median")
    except ImportError:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(50):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(1000.0 * a.elapsed_time(b))
        return statistics.median(times)


def bench_graph(fn, reps: int = 30) -> float:
    """Median GPU time of ``fn`` replayed from a CUDA graph, in microseconds: no launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(1000.0 * a.elapsed_time(b))
    del graph
    return statistics.median(times)


def _graph_or_none(fn) -> Optional[float]:
    """``bench_graph(fn)``, or None where ``fn`` cannot be captured in a CUDA graph."""
    try:
        return bench_graph(fn)
    except Exception as exc:  # noqa: BLE001 - a baseline that does not capture: report, do not time
        print(f"graph capture failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", file=sys.stderr)
        torch.cuda.synchronize()
        return None


_copy_cache: dict[int, float] = {}


def copy_time(nbytes: int) -> float:
    """A device-to-device copy that moves ``nbytes`` in all (half read, half written)."""
    half = nbytes // 2
    if half not in _copy_cache:
        src = torch.randint(0, 255, (half,), dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        _copy_cache[half] = bench(lambda: dst.copy_(src))
        del src, dst
    return _copy_cache[half]


# ----------------------------------------------------------------------------- inputs


def param_shape(shape, axis, group_size):
    if group_size is not None:
        return tuple(shape[:-1]) + (shape[-1] // group_size,)
    if axis is not None:
        return (shape[axis],)
    return (1,)


def make_inputs(shape, dtype, axis, group_size, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    g = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    ps = param_shape(shape, axis, group_size)
    s = torch.rand(ps, generator=gen, device="cuda") * 0.3 + 0.2  # about 6% of values clip at int4
    z = torch.randint(-2, 3, ps, generator=gen, device="cuda").float()
    return x, g, s, z


def minimal_bytes(op, n, esize, nparams):
    if op == "ste":  # fwd: x -> y, mask; bwd: grad, mask -> dx
        return 4 * n * esize + 2 * (n // 8) + 8 * nparams
    if op == "lsq":  # fwd: x -> y; bwd: x, grad -> dx, dscale, dzero_point
        return 5 * n * esize + 8 * nparams + 16 * nparams
    if op == "pact":  # fwd: x -> y; bwd: x, grad -> dx
        return 5 * n * esize + 8
    if op == "aminmax":  # x -> min, max
        return n * esize + 8 * nparams
    raise ValueError(op)


# ----------------------------------------------------------------------------- the three contenders


def ours_parts(op, x, g, s, z, axis, gs, tuning: KernelTuning = DEFAULT_TUNING):
    """(forward, backward) callables of the kernels alone (inputs of the backward made once)."""
    be, t = cupy_backend, tuning
    if op == "ste":
        _, m = be.fake_quantize_forward(x, s, z, QMIN, QMAX, axis, gs, tuning=t)
        return (
            lambda: be.fake_quantize_forward(x, s, z, QMIN, QMAX, axis, gs, tuning=t),
            lambda: be.fake_quantize_backward(g, m, tuning=t),
        )
    if op == "lsq":
        return (
            lambda: be.fake_quantize_lsq_forward(x, s, z, QMIN, QMAX, axis, gs, tuning=t),
            lambda: be.fake_quantize_lsq_backward(g, x, s, z, QMIN, QMAX, axis, gs, 0.01, tuning=t),
        )
    if op == "pact":
        alpha = torch.tensor([2.0], device="cuda")
        return (
            lambda: be.fake_quantize_pact_forward(x, alpha, 0, 15, tuning=t),
            lambda: be.fake_quantize_pact_backward(g, x, alpha, tuning=t),
        )
    return (lambda: be._aminmax_kernel(x, axis, gs, tuning=t), None)


def ours_fn(op, x, g, s, z, axis, gs, tuning: KernelTuning = DEFAULT_TUNING):
    be, t = cupy_backend, tuning
    if op == "ste":

        def fn():
            _, m = be.fake_quantize_forward(x, s, z, QMIN, QMAX, axis, gs, tuning=t)
            be.fake_quantize_backward(g, m, tuning=t)

    elif op == "lsq":

        def fn():
            be.fake_quantize_lsq_forward(x, s, z, QMIN, QMAX, axis, gs, tuning=t)
            be.fake_quantize_lsq_backward(g, x, s, z, QMIN, QMAX, axis, gs, 0.01, tuning=t)

    elif op == "pact":
        alpha = torch.tensor([2.0], device="cuda")

        def fn():
            be.fake_quantize_pact_forward(x, alpha, 0, 15, tuning=t)
            be.fake_quantize_pact_backward(g, x, alpha, tuning=t)

    else:

        def fn():
            be._aminmax_kernel(x, axis, gs, tuning=t)

    return fn


def ours_op_fn(op, x, g, s, z, axis, gs, tuning: KernelTuning = DEFAULT_TUNING):
    """The public ops (custom-op dispatch + autograd) around the same kernels, forward + backward; the
    ops take no tuning argument, so ``tuning`` is installed around each call (``use_tuning``)."""
    fn = _op_fn(op, x, g, s, z, axis, gs)
    if tuning is cupy_backend.current_tuning():
        return fn

    def tuned():
        with cupy_backend.use_tuning(tuning):
            return fn()

    return tuned


def _op_fn(op, x, g, s, z, axis, gs):
    from qat.kernels import fake_quantize_lsq, fake_quantize_pact

    if op == "aminmax":
        return lambda: cupy_backend.aminmax(x, axis, gs)
    xr = x.detach().requires_grad_()
    if op == "ste":
        f, params = (lambda: fake_quantize(xr, s, z, QMIN, QMAX, axis, gs)), [xr]
    elif op == "lsq":
        sr, zr = s.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
        f, params = (lambda: fake_quantize_lsq(xr, sr, zr, QMIN, QMAX, axis, gs, 0.01)), [xr, sr, zr]
    else:
        alpha = torch.tensor([2.0], device="cuda", requires_grad=True)
        f, params = (lambda: fake_quantize_pact(xr, alpha, 0, 15)), [xr, alpha]
    return lambda: torch.autograd.grad(f(), params, g)


def torch_fn(op, x, g, s, z, axis, gs):
    """PyTorch's own op, forward + backward through autograd (None where it has none)."""
    if op == "aminmax":
        return lambda: cupy_backend.aminmax_torch(x, axis, gs)
    if op == "pact":
        return None
    xv, sv, zv, ax = x, s, z, axis
    if gs is not None:  # per-group = per-channel on a (rows, group) view
        xv, sv, zv, ax = x.reshape(-1, gs), s.reshape(-1), z.reshape(-1), 0
    xr = xv.detach().requires_grad_()
    gv = g.reshape(xv.shape)
    if op == "ste":
        if ax is None:
            sc, zi = float(sv), int(zv)
            f = lambda: torch.fake_quantize_per_tensor_affine(xr, sc, zi, QMIN, QMAX)  # noqa: E731
        else:
            zi = zv.to(torch.int32)
            f = lambda: torch.fake_quantize_per_channel_affine(xr, sv, zi, ax, QMIN, QMAX)  # noqa: E731
        params = [xr]
    else:
        sr, zr = sv.detach().clone().requires_grad_(), zv.detach().clone().requires_grad_()
        if ax is None:
            f = lambda: torch._fake_quantize_learnable_per_tensor_affine(xr, sr, zr, QMIN, QMAX, 0.01)  # noqa: E731
        else:
            f = lambda: torch._fake_quantize_learnable_per_channel_affine(xr, sr, zr, ax, QMIN, QMAX, 0.01)  # noqa: E731
        params = [xr, sr, zr]

    def fn():
        torch.autograd.grad(f(), params, gv)

    fn()  # raises here if the op does not take this dtype
    return fn


def _bcast(p, x, axis, gs):
    return reference.broadcast_param(p, x, axis, gs)


def eager_ste(x, s, z, axis, gs):
    xf = x.float()
    if gs is not None:
        xf = xf.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)  # (..., K) -> (..., K//g, g)
    sb, zb = _bcast(s, x, axis, gs), _bcast(z, x, axis, gs)
    v = xf * (1.0 / sb)
    q = torch.clamp(v + (torch.round(v) - v).detach() + zb, QMIN, QMAX)
    return ((q - zb) * sb).reshape(x.shape).to(x.dtype)


def eager_lsq(x, s, z, axis, gs, f=0.01):
    s = s * f + (s - s * f).detach()  # LSQ gradient scale
    z = z * f + (z - z * f).detach()
    z = torch.clamp(z + (torch.round(z) - z).detach(), QMIN, QMAX)
    xf = x.float()
    if gs is not None:
        xf = xf.reshape(*x.shape[:-1], x.shape[-1] // gs, gs)
    sb, zb = _bcast(s, x, axis, gs), _bcast(z, x, axis, gs)
    v = xf / sb
    q = torch.clamp(v + (torch.round(v) - v).detach() + zb, QMIN, QMAX)
    return ((q - zb) * sb).reshape(x.shape).to(x.dtype)


def eager_pact(x, alpha, qmin=0, qmax=15):
    xc = torch.minimum(torch.relu(x.float()), alpha)
    s = (alpha / (qmax - qmin)).detach()
    v = xc * (1.0 / s)
    q = torch.clamp(v + (torch.round(v) - v).detach() + qmin, qmin, qmax)
    return ((q - qmin) * s).to(x.dtype)


def compiled_fn(op, x, g, s, z, axis, gs):
    if op == "aminmax":
        return None
    # a fresh dynamo cache per variant: the lambdas below share one code object, and after
    # `recompile_limit` (8) guard failures dynamo silently runs the rest *eagerly* (the first runs
    # of this benchmark timed the fp16 "compile" baselines that way: 17-21x "speed-ups")
    torch._dynamo.reset()
    xr = x.detach().requires_grad_()
    if op == "ste":
        c = torch.compile(lambda x_, s_, z_: eager_ste(x_, s_, z_, axis, gs), dynamic=False)
        params, args = [xr], (xr, s, z)
    elif op == "lsq":
        sr, zr = s.detach().clone().requires_grad_(), z.detach().clone().requires_grad_()
        c = torch.compile(lambda x_, s_, z_: eager_lsq(x_, s_, z_, axis, gs), dynamic=False)
        params, args = [xr, sr, zr], (xr, sr, zr)
    else:
        alpha = torch.tensor([2.0], device="cuda", requires_grad=True)
        c = torch.compile(eager_pact, dynamic=False)
        params, args = [xr, alpha], (xr, alpha)

    def fn():
        torch.autograd.grad(c(*args), params, g)

    fn()  # compile outside the timing
    return fn


# ----------------------------------------------------------------------------- memory


def saved_bits_per_element(n=2**24):
    """Memory held for backward after the forward of the STE, in bits per element."""
    x = torch.randn(4096, n // 4096, device="cuda").requires_grad_()
    s = torch.rand(4096, device="cuda") * 0.3 + 0.2
    z = torch.zeros(4096, device="cuda")
    out = {}

    def measure(name, f):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        y = f()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - base - y.numel() * y.element_size()
        out[name] = 8.0 * held / x.numel()
        del y

    measure("ours (qat.kernels.fake_quantize)", lambda: fake_quantize(x, s, z, QMIN, QMAX, axis=0))
    zi = z.to(torch.int32)
    measure("torch.fake_quantize_per_channel_affine", lambda: torch.fake_quantize_per_channel_affine(x, s, zi, 0, QMIN, QMAX))
    try:
        torch._dynamo.reset()
        c = torch.compile(lambda x_, s_, z_: eager_ste(x_, s_, z_, 0, None), dynamic=False)
        c(x, s, z)
        measure("torch.compile(eager formula)", lambda: c(x, s, z))
    except Exception as exc:  # noqa: BLE001
        print(f"compile memory measurement failed: {exc}", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------- shapes


#: 64M-element fp32 tensors for the per-channel STE against torch.fake_quantize_per_channel_affine:
#: (shape, axis); the 3x target of issue #3 was stated on one (unnamed) shape
SHAPES = (
    ((4096, 16384), 0),
    ((4096, 16384), 1),
    ((16384, 4096), 0),
    ((16384, 4096), 1),
    ((65536, 1024), 0),
    ((1024, 65536), 0),
)


def shape_sweep(shapes=SHAPES, tuning: KernelTuning = DEFAULT_TUNING):
    """fp32 per-channel STE (forward + backward) on several shapes: torch's op, ours, the copy."""
    out = []
    for shape, axis in shapes:
        torch.cuda.empty_cache()
        x, g, s, z = make_inputs(shape, torch.float32, axis, None)
        n = x.numel()
        nbytes = minimal_bytes("ste", n, 4, s.numel())
        r = dict(shape=list(shape), axis=axis, numel=n, bytes=nbytes)
        fn = ours_fn("ste", x, g, s, z, axis, None, tuning)
        r["ours_us"] = bench_graph(fn)
        r["ours_eager_us"] = bench(fn)
        r["torch_us"] = bench(torch_fn("ste", x, g, s, z, axis, None))
        r["copy_us"] = copy_time(nbytes)
        r["speedup_torch"] = r["torch_us"] / r["ours_eager_us"]
        r["ceiling"] = r["torch_us"] / r["copy_us"]  # the speed-up a kernel at the copy would have
        out.append(r)
        print(_fmt_shape(r), flush=True)
        del x, g, s, z
    return out


SHAPE_HEADER = (
    "| shape | axis | torch us | ours eager us | ours kernels us | copy us | vs torch | at the copy |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|"
)


def _fmt_shape(r):
    return (
        f"| {'x'.join(map(str, r['shape']))} | {r['axis']} | {r['torch_us']:.1f} | {r['ours_eager_us']:.1f} "
        f"| {r['ours_us']:.1f} | {r['copy_us']:.1f} | {r['speedup_torch']:.2f}x | {r['ceiling']:.2f}x |"
    )


# ----------------------------------------------------------------------------- main


def run(numel: int, with_compile: bool, only=None, quick=False, tuning: KernelTuning = DEFAULT_TUNING):
    rows = []
    k = 16384 if numel % 16384 == 0 else 128
    shape = (numel // k, k)
    for op in ("ste", "lsq", "pact", "aminmax"):
        for dname, dtype in DTYPES.items():
            for gname, gran in GRANULARITIES.items():
                if op == "pact" and gname != "tensor":
                    continue
                if only and not any(fnmatch.fnmatch(f"{op}/{dname}/{gname}", pat) for pat in only):
                    continue
                axis, gs = gran["axis"], gran["group_size"]
                torch.cuda.empty_cache()
                x, g, s, z = make_inputs(shape, dtype, axis, gs)
                nparams = s.numel()
                esize = x.element_size()
                nbytes = minimal_bytes(op, numel, esize, nparams)
                row = dict(op=op, dtype=dname, granularity=gname, numel=numel, bytes=nbytes)
                fn = ours_fn(op, x, g, s, z, axis, gs, tuning)
                row["ours_eager_us"] = None if quick else bench(fn)
                row["ours_us"] = bench_graph(fn)  # GPU time of the kernels (graph replay)
                row["ours_op_us"] = None if quick else bench(ours_op_fn(op, x, g, s, z, axis, gs, tuning))
                row["copy_us"] = copy_time(nbytes)
                row["ratio_copy"] = row["ours_us"] / row["copy_us"]
                row["ours_TBps"] = nbytes / row["ours_us"] / 1e6
                fwd, bwd = ours_parts(op, x, g, s, z, axis, gs, tuning)
                row["fwd_us"] = bench_graph(fwd)
                row["bwd_us"] = bench_graph(bwd) if bwd is not None else None
                for name, maker in (("torch", torch_fn), ("compile", compiled_fn)):
                    row[f"{name}_us"] = None
                    if quick or (name == "compile" and not with_compile):
                        continue
                    try:
                        fn = maker(op, x, g, s, z, axis, gs)
                        if fn is not None:
                            row[f"{name}_us"] = bench(fn)
                            if name == "compile":  # its kernels' GPU time, as `kernels` is ours
                                row["compile_graph_us"] = _graph_or_none(fn)
                    except Exception as exc:  # noqa: BLE001 - an op that does not take this dtype
                        row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                    torch.cuda.empty_cache()
                for name in ("torch", "compile"):  # eager against eager
                    t = row[f"{name}_us"]
                    row[f"speedup_{name}"] = t / row["ours_eager_us"] if t and row["ours_eager_us"] else None
                t = row.get("compile_graph_us")  # GPU time against GPU time (no host launch overhead)
                row["speedup_compile_gpu"] = t / row["ours_us"] if t else None
                rows.append(row)
                print(_fmt_row(row), flush=True)
                del x, g, s, z
    return rows


def _f(v, fmt):
    return "n/a" if v is None else format(v, fmt)


def _x(v):
    return "n/a" if v is None else f"{v:.2f}x"


HEADER = (
    "| op | dtype | granularity | kernels us | fwd / bwd us | copy us | kernels/copy | TB/s | eager us | via op us "
    "| torch us | vs torch | compile us | vs compile | compile kernels us | vs compile (GPU) |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def _fmt_row(r):
    return (
        f"| {r['op']} | {r['dtype']} | {r['granularity']} | {r['ours_us']:.1f} | {r['fwd_us']:.1f} / {_f(r['bwd_us'], '.1f')} "
        f"| {r['copy_us']:.1f} | {r['ratio_copy']:.3f} | {r['ours_TBps']:.2f} | {_f(r['ours_eager_us'], '.1f')} "
        f"| {_f(r['ours_op_us'], '.1f')} "
        f"| {_f(r['torch_us'], '.1f')} | {_x(r['speedup_torch'])} | "
        f"{_f(r['compile_us'], '.1f')} | {_x(r['speedup_compile'])} | "
        f"{_f(r.get('compile_graph_us'), '.1f')} | {_x(r.get('speedup_compile_gpu'))} |"
    )


def targets(rows, bits):
    def pick(op, dtype, gran):
        return next((r for r in rows if (r["op"], r["dtype"], r["granularity"]) == (op, dtype, gran)), None)

    out = []
    worst = max(rows, key=lambda r: r["ratio_copy"])
    out.append(("every variant within 10% of the copy ceiling", worst["ratio_copy"] <= 1.10,
                f"worst {worst['op']}/{worst['dtype']}/{worst['granularity']}: {worst['ratio_copy']:.3f}"))
    for dtype, need in (("fp32", 3.0), ("bf16", 5.0)):
        r = pick("ste", dtype, "channel0")
        sp = r and r["speedup_torch"]
        out.append((f">= {need}x torch.fake_quantize_per_channel_affine ({dtype})", bool(sp and sp >= need), _x(sp)))
    r = pick("lsq", "fp32", "channel0")
    sp = r and r["speedup_torch"]
    out.append((">= 3.5x torch._fake_quantize_learnable_per_channel_affine (fp32)", bool(sp and sp >= 3.5), _x(sp)))
    sps = [r["speedup_compile"] for r in rows if r["speedup_compile"] is not None]
    out.append(("faster than torch.compile of the eager formula (every variant)", bool(sps) and min(sps) > 1.0,
                f"min {_x(min(sps) if sps else None)} over {len(sps)} variants"))
    gps = [r["speedup_compile_gpu"] for r in rows if r.get("speedup_compile_gpu") is not None]
    out.append(("faster than torch.compile, GPU time against GPU time (every variant)", bool(gps) and min(gps) > 1.0,
                f"min {_x(min(gps) if gps else None)}, faster in {sum(g > 1.0 for g in gps)} of {len(gps)} variants"))
    b = bits.get("ours (qat.kernels.fake_quantize)")
    out.append(("STE forward keeps 1 bit/element for backward", b is not None and abs(b - 1.0) < 0.01, f"{_f(b, '.3f')} bits"))
    return out


def explore(numel: int, base: KernelTuning = DEFAULT_TUNING):
    """Kernel-only times (graph replay) of forward and backward under several grid sizes (the seg
    reductions' and the element-wise kernels' waves)."""
    shape = (numel // 16384, 16384)
    print("| op | dtype | gran | waves | fwd us | fwd/copy | bwd us | bwd/copy |")
    for op, dname, gname in (
        ("ste", "fp32", "channel0"), ("ste", "bf16", "channel0"), ("lsq", "fp32", "tensor"),
        ("lsq", "fp32", "channel0"), ("lsq", "bf16", "group128"), ("aminmax", "fp32", "channel0"),
    ):  # fmt: skip
        gran = GRANULARITIES[gname]
        x, g, s, z = make_inputs(shape, DTYPES[dname], gran["axis"], gran["group_size"])
        e = x.element_size()
        fwd_bytes = {"ste": 2 * numel * e + numel // 8, "lsq": 2 * numel * e, "aminmax": numel * e}[op]
        bwd_bytes = {"ste": 2 * numel * e + numel // 8, "lsq": 3 * numel * e, "aminmax": 0}[op]
        for waves in (1, 2, 8):
            tuning = dataclasses.replace(base, seg_waves=waves, elementwise_waves=waves)
            fwd, bwd = ours_parts(op, x, g, s, z, gran["axis"], gran["group_size"], tuning)
            tf = bench_graph(fwd)
            tb = bench_graph(bwd) if bwd else float("nan")
            cf = copy_time(fwd_bytes)
            cb = copy_time(bwd_bytes) if bwd_bytes else float("nan")
            print(f"| {op} | {dname} | {gname} | {waves} | {tf:.1f} | {tf / cf:.3f} | {tb:.1f} | {tb / cb:.3f} |", flush=True)
        del x, g, s, z


def launch_overhead():
    """CPU cost of one call (small tensor, so the GPU waits on the CPU), and a profile of the forward."""
    import cProfile
    import pstats

    from qat.kernels import fake_quantize

    x = torch.randn(64, 1024, device="cuda")
    s = torch.rand(64, device="cuda") * 0.3 + 0.2
    z = torch.zeros(64, device="cuda")
    xr = x.clone().requires_grad_()
    g = torch.randn_like(x)
    cases = {
        "backend fwd": lambda: cupy_backend.fake_quantize_forward(x, s, z, QMIN, QMAX, 0),
        "torch.fake_quantize_per_channel_affine fwd": lambda: torch.fake_quantize_per_channel_affine(
            x, s, z.int(), 0, QMIN, QMAX
        ),
        "public op fwd+bwd (autograd)": lambda: torch.autograd.grad(fake_quantize(xr, s, z, QMIN, QMAX, 0), [xr], g),
        "x.add(1) (a bare PyTorch launch)": lambda: x.add(1),
    }
    for name, f in cases.items():
        for _ in range(20):
            f()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(500):
            f()
        torch.cuda.synchronize()
        print(f"launch overhead: {name}: {(time.perf_counter() - t0) / 500 * 1e6:.1f} us/call")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        cupy_backend.fake_quantize_forward(x, s, z, QMIN, QMAX, 0)
    prof.disable()
    torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(12)


def tuning_from(items, base: KernelTuning = DEFAULT_TUNING) -> KernelTuning:
    """:func:`qat.kernels.tuning.tuning_from`, exiting with the reason on a bad item."""
    try:
        return parse_tuning(items, base)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc


def sweep(numel: int, only, configs, base: KernelTuning = DEFAULT_TUNING):
    """Kernel and copy times (as --quick) once per config (``'FIELD=VALUE ...'``, applied to ``base``);
    configs that change compile-time fields compile their own modules."""
    tunings = [tuning_from(cfg.split(), base) for cfg in configs]  # all parsed before any GPU work
    for cfg, tuning in zip(configs, tunings):
        print(f"## config: {cfg or '(defaults)'}", flush=True)
        run(numel, False, only, True, tuning)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--numel", type=int, default=64 * 2**20)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--explore", action="store_true", help="grid-size sweep and launch overhead, then exit")
    ap.add_argument("--only", default=None, help="comma-separated op/dtype/granularity globs (e.g. 'lsq/*/group128')")
    ap.add_argument("--quick", action="store_true", help="kernel and copy times only; print, write nothing")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a KernelTuning field for the whole run, e.g. cols_rows_minmax=4 (repeatable)")
    ap.add_argument("--shapes", action="store_true", help="only the fp32 per-channel STE shape sweep; print")
    ap.add_argument("--sweep", action="append", default=[], metavar="'FIELD=VALUE ...'",
                    help="with --quick: run once per such config of KernelTuning fields (on top of --set)")
    args = ap.parse_args(argv)
    tuning = tuning_from(args.set)
    if not (torch.cuda.is_available() and cupy_backend.available()):
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and CuPy")
    if args.explore:
        launch_overhead()
        explore(args.numel, tuning)
        return
    import cupy

    t0 = time.time()
    gpu = torch.cuda.get_device_name()
    meta = dict(
        gpu=gpu,
        torch=torch.__version__,
        cupy=cupy.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        numel=args.numel,
        qrange=[QMIN, QMAX],
        timing="median of triton.testing.do_bench (CUDA events)",
        tuning={k: list(v) if isinstance(v, tuple) else v for k, v in tuning.changes().items()},
    )
    if args.shapes:
        print(SHAPE_HEADER, flush=True)
        shape_sweep(tuning=tuning)
        return
    print(HEADER, flush=True)
    only = [p.strip() for p in args.only.split(",")] if args.only else None
    if args.sweep:
        sweep(args.numel, only, args.sweep, tuning)
        return
    rows = run(args.numel, not args.no_compile, only, args.quick, tuning)
    if args.quick:
        return
    shapes = None
    if not only:
        print(SHAPE_HEADER, flush=True)
        shapes = shape_sweep(tuning=tuning)
    bits = saved_bits_per_element()
    checks = targets(rows, bits)
    meta["seconds"] = round(time.time() - t0, 1)

    tag = re.sub(r"[^a-z0-9]+", "_", gpu.lower())
    tag = "h100" if "h100" in tag else ("h200" if "h200" in tag else tag.strip("_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        f"# Fake-quant kernels on {gpu}",
        "",
        f"{meta['date']}; torch {meta['torch']} (CUDA {meta['cuda']}), CuPy {meta['cupy']}; "
        f"{args.numel:,} elements, int4 [{QMIN}, {QMAX}], forward + backward; median times (us)"
        + (f"; tuning (KernelTuning, non-default fields) {meta['tuning']}." if meta["tuning"] else "."),
        "`kernels`: GPU time of the CuPy kernels (forward + backward replayed from a CUDA graph, so no launch",
        "overhead); `fwd / bwd`: each alone; `eager`: the same calls timed eagerly with CUDA events; `via op`:",
        "through the public ops and autograd (eager). `copy`: a device-to-device copy moving the op's minimal",
        "bytes; `kernels/copy` 1.00 = at that ceiling. Speed-ups compare eager with eager, except",
        "`vs compile (GPU)`: `compile kernels`, Inductor's kernels replayed from a CUDA graph, against our",
        "`kernels` (the eager compile times carry dynamo's and AOTAutograd's host time, which varies run to run).",
        "`torch`: PyTorch's fake-quant op (learnable op for lsq; torch.aminmax for aminmax);",
        "`compile`: torch.compile of the eager round/clamp formula with a detach STE.",
        "granularity: tensor; channel0 = axis 0 (4096 channels); channel1 = last axis (16384 channels); group128.",
        "",
        HEADER,
        *(_fmt_row(r) for r in rows),
        "",
        *(
            [
                "## fp32 per-channel STE on other 64M-element shapes (forward + backward)",
                "",
                "`vs torch`: eager against eager, as above; `at the copy`: torch / copy, the speed-up of a kernel",
                "running at the copy ceiling (no kernel can beat it by more on that shape).",
                "",
                SHAPE_HEADER,
                *(_fmt_shape(r) for r in shapes),
                "",
            ]
            if shapes
            else []
        ),
        "## Memory kept for backward by the STE forward (bits per element)",
        "",
        *(f"- {k}: {v:.3f}" for k, v in bits.items()),
        "",
        "## Targets",
        "",
        *(f"- [{'x' if ok else ' '}] {name}: {detail}" for name, ok, detail in checks),
        "",
    ]
    (out / f"kernels_{tag}.md").write_text("\n".join(lines))
    (out / f"kernels_{tag}.json").write_text(
        json.dumps(dict(meta=meta, rows=rows, shapes=shapes, saved_bits_per_element=bits,
                        targets=[dict(name=n, met=ok, detail=d) for n, ok, d in checks]), indent=1)
    )
    print("\n".join(lines[-(len(bits) + len(checks) + 7):]))
    print(f"wrote {out / f'kernels_{tag}.md'} and .json in {meta['seconds']} s")


if __name__ == "__main__":
    main()
