"""GPTQ vs round-to-nearest: output error of a small Linear stack at 3-bit weights, per granularity.

    python benchmarks/gptq.py            # prints the table, writes benchmarks/results/gptq.md

Inputs are correlated with uneven channel scales (as real activations are); calibration and test
samples come from the same distribution, seeds fixed. Error = mean squared difference of the
outputs to the float model on held-out samples.
"""

from __future__ import annotations

import copy
import datetime
import pathlib

import torch
import torch.nn as nn

from qat import prepare
from qat.gptq import gptq
from qat.ptq import calibrate


def _data(n: int, d: int, seed: int) -> torch.Tensor:
    mix = torch.randn(d, d, generator=torch.Generator().manual_seed(1234)) / d**0.5
    return (torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mix) * torch.linspace(0.2, 3.0, d)


def main() -> None:
    rows = []
    for gran, extra in (("per_tensor", {}), ("per_channel", {}), ("per_group", {"group_size": 16})):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32))
        x_cal, x_test = _data(512, 64, 0), _data(512, 64, 1)
        ref = model(x_test).detach()
        plan = {"name": "w3", "rules": [{"match": "*", "weight": {"bits": 3, "granularity": gran, **extra}}]}
        rtn = prepare(copy.deepcopy(model), plan)
        calibrate(rtn, [x_cal])
        ours = prepare(copy.deepcopy(model), plan)
        gptq(ours, [x_cal])
        with torch.no_grad():
            e_rtn = float((rtn(x_test) - ref).pow(2).mean())
            e_gptq = float((ours(x_test) - ref).pow(2).mean())
        rows.append((gran + (f" (g={extra['group_size']})" if extra else ""), e_rtn, e_gptq))
    lines = [
        f"# GPTQ vs round-to-nearest, 3-bit weights (Linear 64-48-32), {datetime.date.today()}, torch {torch.__version__}",
        "",
        "| granularity | RTN output MSE | GPTQ output MSE | GPTQ / RTN |",
        "|---|---:|---:|---:|",
    ] + [f"| {g} | {a:.6f} | {b:.6f} | {b / a:.3f} |" for g, a, b in rows]
    lines += ["", "Command: `python benchmarks/gptq.py`"]
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(__file__).resolve().parent / "results" / "gptq.md"
    out.write_text(text)


if __name__ == "__main__":
    main()
