"""CPU cost of one fake-quant forward + backward call through each path (tiny tensor, so the
math is negligible and the call machinery is what is timed).

    python benchmarks/op_overhead.py     # prints the table, writes benchmarks/results/op_overhead.md

Paths: the public ``qat.kernels.fake_quantize`` (eager: an autograd Function straight to the
backend); the registered ``torch.ops.qat.fake_quantize`` custom op (what torch.compile sees); and
the reference functions called directly, without autograd (the floor).
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

    def custom_op():
        torch.ops.qat.fake_quantize(x, s, z, -8, 7, None, None, "half_even")[0].sum().backward()

    def direct():
        y, m = R.fake_quantize_forward(x.detach(), s, z, -8, 7)
        R.fake_quantize_backward(torch.ones_like(y), m)

    rows = [("public fake_quantize (eager autograd.Function)", _time_us(public)),
            ("torch.ops.qat.fake_quantize (custom op + registered autograd)", _time_us(custom_op)),
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
