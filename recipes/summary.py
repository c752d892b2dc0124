"""A Hydra callback that ends a multirun with one table of every job's results."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["SweepSummary"]


class SweepSummary(Callback):
    """Reads each job's ``results.json`` under the sweep directory and prints a summary table.

    Also writes ``summary.json`` beside the jobs. ``configs/train.yaml`` registers it under
    ``hydra.callbacks``, so every ``qat-train -m ...`` sweep ends with it.

    Example::

        >>> import json, os, tempfile
        >>> from omegaconf import OmegaConf
        >>> sweep = tempfile.mkdtemp()
        >>> os.makedirs(f"{sweep}/0_w4a4")
        >>> r = {"plan": "w4a4", "fp": {"test_acc": 0.99, "bytes": 4096}, "ptq": {"test_acc": 0.98, "bytes": 1024},
        ...      "qat": {"test_acc": 0.985, "bytes": 1024}}
        >>> with open(f"{sweep}/0_w4a4/results.json", "w") as f:
        ...     json.dump(r, f)
        >>> import contextlib, io
        >>> with contextlib.redirect_stdout(io.StringIO()) as out:
        ...     SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": sweep}}}))
        >>> "sweep summary (1 runs)" in out.getvalue()
        True
        >>> json.load(open(f"{sweep}/summary.json"))[0]["plan"]
        'w4a4'
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .train import print_results

        sweep_dir = config.hydra.sweep.dir
        results = []
        for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "results.json"))):
            with open(path) as f:
                results.append(json.load(f))
        if not results:
            print(f"SweepSummary: no results.json under {sweep_dir}")
            return
        with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
            json.dump(results, f, indent=2)
        print_results(results, title=f"lightning-qat sweep summary ({len(results)} runs)")
