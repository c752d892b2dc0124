"""CPU cost of one fake-quant forward + backward call through each path (tiny tensor, so the
math is negligible and the call machinery is what is timed).

    python benchmarks/op_overhead.py     # prints the table, writes benchmarks/results/op_overhead.md

Paths: the public ``qat.kernels.fake_quantize`` (eager: an autograd Function straight to the
backend); the registered ``torch.ops.qat.fake_quantize`` and ``fake_quantize_backward`` ops as a
compiled graph calls them (grad mode off, no autograd kernel); the same two kernels behind a
``torch.library.custom_op`` with a registered autograd formula (how the ops were registered before,
defined here for the comparison); and the reference functions called directly, without autograd
(the floor).
"""

from __future__ import annotations

import datetime
import pathlib
import statistics
import time

import torch

from qat.kernels import fake_quantize
from qat.kernels import reference as R


def _time_us(fn, n: int = 500, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(8, requires_grad=True)
    s, z = torch.tensor([0.1]), torch.tensor([0.0])

    def public():
        fake_quantize(x, s, z, -8, 7).sum().backward()

    @torch.library.custom_op("qat_bench::fake_quantize", mutates_args=())
    def _fq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
        return R.fake_quantize_forward(x, scale, zero_point, qmin, qmax)

    @torch.library.custom_op("qat_bench::fake_quantize_backward", mutates_args=())
    def _fq_bwd(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return R.fake_quantize_backward(grad, mask)

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])

    def _grad(ctx, grad_y, grad_mask):
        return torch.ops.qat_bench.fake_quantize_backward(grad_y, ctx.saved_tensors[0]), None, None, None, None

    _fq.register_autograd(_grad, setup_context=_setup)
    xd, g = x.detach(), torch.ones(8)

    def registered():
        with torch.no_grad():
            y, m = torch.ops.qat.fake_quantize.default(xd, s, z, -8, 7, None, None, "half_even", None)
            torch.ops.qat.fake_quantize_backward.default(g, m, None)

    def custom_op():
        with torch.no_grad():
            y, m = torch.ops.qat_bench.fake_quantize.default(xd, s, z, -8, 7)
            torch.ops.qat_bench.fake_quantize_backward.default(g, m)

    def direct():
        y, m = R.fake_quantize_forward(x.detach(), s, z, -8, 7)
        R.fake_quantize_backward(torch.ones_like(y), m)

    rows = [("public fake_quantize (eager autograd.Function)", _time_us(public)),
            ("torch.ops.qat.fake_quantize + _backward, grad off (what a compiled graph calls)", _time_us(registered)),
            ("the same kernels as torch.library.custom_op with an autograd formula, grad off", _time_us(custom_op)),
            ("reference functions, no autograd (floor)", _time_us(direct))]
    lines = [f"# Fake-quant call overhead on the CPU, forward + backward of 8 elements, {datetime.date.today()}, "
             f"torch {torch.__version__}, 1 thread", "", "| path | us per call (median of 5 x 500) |", "|---|---:|"]
    lines += [f"| {name} | {us:.0f} |" for name, us in rows]
    lines += ["", "Command: `python benchmarks/op_overhead.py`"]
    text = "\n".join(lines) + "\n"
    print(text)
    (pathlib.Path(__file__).resolve().parent / "results" / "op_overhead.md").write_text(text)


if __name__ == "__main__":
    main()
