"""Hydra callbacks of the recipes: :class:`SweepSummary` ends a multirun with one table of every
job of that sweep, failed ones included; :class:`RunDirGuard` refuses to start a run in a
directory that holds another run's ``results.json`` before Hydra writes anything there."""

from __future__ import annotations

import glob
import json
import logging
import os
import uuid
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "RunDirGuard", "SWEEP_ID_ENV", "pareto_front", "pareto_figure", "plan_kind"]

log = logging.getLogger(__name__)

#: The environment variable through which a sweep's id reaches its jobs (written into ``results.json``).
SWEEP_ID_ENV = "QAT_SWEEP_ID"


def _plan_name(config: Any) -> Optional[str]:
    try:
        return OmegaConf.select(config, "quant.name", default=None)
    except Exception:  # an interpolation that does not resolve
        return None


class SweepSummary(Callback):
    """Ends a multirun with a summary of this sweep's jobs: finished ones (their ``results.json``) and
    failed ones (status, error message) beside them.

    Writes ``summary.json`` (a list: each finished job's results with ``"status": "finished"``, each
    failed job's ``{"status": "failed", "job", "plan", "output_dir", "overrides", "error"}``) in the
    sweep directory. Only the jobs of this sweep count: the callback records each job as it ends,
    and every job's ``results.json`` carries the sweep's id (``sweep_id``), so results that an
    earlier sweep left in a reused sweep directory are ignored. A failed job does not stop the
    others nor the summary; the sweep then ends with the first failure's error on stderr and exit
    status 1.
    ``configs/train.yaml`` registers it under ``hydra.callbacks``, so every ``qat-train -m ...``
    sweep ends with it.

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

    def __init__(self) -> None:
        self.sweep_id: Optional[str] = None
        self.jobs: list[dict[str, Any]] = []
        self.first_error: Optional[BaseException] = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = uuid.uuid4().hex[:12]
        self.jobs, self.first_error = [], None
        os.environ[SWEEP_ID_ENV] = self.sweep_id

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        out_dir = config.hydra.runtime.output_dir
        entry = {"job": config.hydra.job.num, "plan": _plan_name(config), "output_dir": out_dir,
                 "overrides": list(job_return.overrides or [])}
        if job_return.status == JobStatus.FAILED:
            exc = job_return._return_value
            log.error("job %s (%s) failed: %s", entry["job"], " ".join(entry["overrides"]), exc, exc_info=exc)
            entry.update(status="failed", error=f"{type(exc).__name__}: {exc}")
            if self.first_error is None:
                self.first_error = exc
            # let the sweep go on to the other jobs and to on_multirun_end; the error is raised there
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = None
        else:
            entry["status"] = "finished"
        self.jobs.append(entry)

    def _finished_without_records(self, sweep_dir: str) -> list[dict[str, Any]]:
        """No job records (a launcher that runs jobs elsewhere): the results.json of this sweep."""
        out = []
        for path in sorted(glob.glob(os.path.join(sweep_dir, "*", "results.json"))):
            with open(path) as f:
                res = json.load(f)
            if self.sweep_id is None or res.get("sweep_id") == self.sweep_id:
                out.append({**res, "status": "finished"})
        return out

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from .atomic import write_json
        from .train import print_results

        try:
            sweep_dir = config.hydra.sweep.dir
            if self.jobs:
                entries = []
                for job in self.jobs:
                    path = os.path.join(job["output_dir"], "results.json")
                    if job["status"] == "finished" and os.path.isfile(path):
                        with open(path) as f:
                            entries.append({**json.load(f), "status": "finished", "job": job["job"]})
                    elif job["status"] == "finished":
                        entries.append({**job, "status": "failed", "error": f"no results.json in {job['output_dir']}"})
                    else:
                        entries.append(job)
            else:
                entries = self._finished_without_records(sweep_dir)
            if not entries:
                print(f"SweepSummary: no results.json under {sweep_dir}")
                return
            write_json(entries, os.path.join(sweep_dir, "summary.json"))
            finished = [e for e in entries if e["status"] == "finished"]
            failed = [e for e in entries if e["status"] != "finished"]
            if finished:
                title = f"lightning-qat sweep summary ({len(finished)} runs" + (f", {len(failed)} failed)" if failed else ")")
                print_results(finished, title=title)
                png = pareto_figure(finished, os.path.join(sweep_dir, "pareto.png"))
                if png:
                    print(f"accuracy against size: {png}")
            for e in failed:
                print(f"FAILED job {e['job']} ({e.get('plan')}): {e['error']}  [{e['output_dir']}]")
            if failed:
                print(f"lightning-qat sweep: {len(finished)} finished, {len(failed)} failed (summary: {sweep_dir}/summary.json)")
        finally:
            os.environ.pop(SWEEP_ID_ENV, None)
            self.sweep_id = None
        if self.first_error is not None:
            err, self.first_error = self.first_error, None
            # Hydra turns a callback's exception into a warning: exit non-zero ourselves
            _exit_with(f"lightning-qat sweep: a job failed, first error: {type(err).__name__}: {err}")


class RunDirGuard(Callback):
    """Refuses a single run whose ``hydra.run.dir`` already holds a ``results.json`` (another run's),
    before Hydra writes that run's ``.hydra/`` config there; ``overwrite=true`` or ``resume=<dir>``
    let it through. Registered under ``hydra.callbacks`` by ``configs/train.yaml`` and ``ptq.yaml``.
    Under Hydra it prints the :class:`qat.QATConfigError` and exits with status 1 (Hydra would turn
    a callback's exception into a warning); called directly it raises.

    Example::

        >>> import os, tempfile
        >>> from omegaconf import OmegaConf
        >>> d = tempfile.mkdtemp()
        >>> RunDirGuard().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": d}}}))
        >>> open(os.path.join(d, "results.json"), "w").close()
        >>> RunDirGuard().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": d}}}))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: ...results.json already exists: another run wrote there; ...
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from qat import QATConfigError

        from .config import check_output_dir

        try:
            check_output_dir(
                os.path.abspath(str(config.hydra.run.dir)), overwrite=bool(config.get("overwrite", False)),
                resume=config.get("resume"),
            )
        except QATConfigError as exc:
            if kwargs.get("config_name") is None:  # called directly (not by Hydra): a plain exception
                raise
            _exit_with(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")


def _exit_with(message: str) -> None:
    """Hydra turns an exception raised in a callback into a warning; stop the run with ``message`` instead."""
    import sys

    print(message, file=sys.stderr)
    raise SystemExit(1)


def pareto_front(points: list[tuple[float, float]], maximize: bool = True) -> list[int]:
    """Indices of the ``(size, value)`` points no other point beats (smaller or equal size and a better
    or equal value, one of them strictly), sorted by size.

    Example::

        >>> pareto_front([(4, 0.9), (2, 0.95), (1, 0.5), (3, 0.94)])
        [2, 1]
    """
    sign = 1.0 if maximize else -1.0
    front = []
    for i, (b, v) in enumerate(points):
        dominated = any(
            (b2 <= b and sign * v2 >= sign * v) and (b2 < b or sign * v2 > sign * v) for j, (b2, v2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def plan_kind(result: dict[str, Any]) -> str:
    """``"mixed"`` when the plan of a run (the ``quant`` node of ``<output_dir>/run_config.yaml``, or
    the result's own ``quant``) gives weights more than one bit-width (an allocated plan of
    ``qat-sensitivity``), else ``"uniform"`` (also when the plan cannot be read).

    Example::

        >>> plan_kind({"quant": {"name": "m", "rules": [{"match": "*", "weight": {"bits": 2}},
        ...                                              {"match": "fc", "weight": {"bits": 8}}]}})
        'mixed'
        >>> plan_kind({"output_dir": "/nonexistent"})
        'uniform'
    """
    from qat import QATConfigError
    from qat.allocate import is_mixed_precision

    quant = result.get("quant")
    path = os.path.join(str(result.get("output_dir", "")), "run_config.yaml")
    if quant is None and os.path.isfile(path):
        quant = OmegaConf.to_container(OmegaConf.load(path), resolve=False).get("quant")
    try:
        return "mixed" if quant is not None and is_mixed_precision(quant) else "uniform"
    except QATConfigError:
        return "uniform"


def pareto_figure(results: list[dict[str, Any]], path: str) -> Optional[str]:
    """A sweep's QAT and PTQ results as metric against model size, the QAT Pareto front joined, float
    as a line: written to ``path`` (PNG). Mixed-precision plans (:func:`plan_kind`: the allocated
    plans of ``qat-sensitivity``) are drawn apart from uniform ones (stars against triangles for
    QAT, crosses against squares for PTQ). Returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    metric = results[0].get("metric", "test/acc")
    field = metric.replace("/", "_")
    maximize = results[0].get("mode", "max") == "max"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    kinds = [plan_kind(r) for r in results]
    for stage, markers in (("qat", {"uniform": "^", "mixed": "*"}), ("ptq", {"uniform": "s", "mixed": "X"})):
        for kind, marker in markers.items():
            rs = [r for r, k in zip(results, kinds) if k == kind]
            if rs:
                ax.scatter([r[stage]["bytes"] / 1024 for r in rs], [r[stage][field] for r in rs], marker=marker,
                           s=70 if marker == "*" else 30, label=f"{stage.upper()} {kind}")
    pts = [(r["qat"]["bytes"], r["qat"][field]) for r in results]
    front = pareto_front(pts, maximize)
    ax.plot([pts[i][0] / 1024 for i in front], [pts[i][1] for i in front], "-", alpha=0.6, label="QAT Pareto front")
    for r in results:
        ax.annotate(r.get("plan", "?"), (r["qat"]["bytes"] / 1024, r["qat"][field]), fontsize=7)
    ax.axhline(results[0]["fp"][field], linestyle="--", color="gray", label="float")
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
