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

    Also writes ``summary.json`` beside the jobs.
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
