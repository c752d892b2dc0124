"""``qat-sensitivity``: per-layer sensitivity at every candidate bit-width, the least damaging plan
under each size budget as a ``quant/`` preset, and the Pareto table of predicted (and, with
``measure=true``, PTQ-measured) quality against size.

    qat-sensitivity                                           # digits CNN, base plan w2a4, budgets 3 and 4 bits
    qat-sensitivity sensitivity.method=hessian budgets=[2.5,3,4]   # HAWQ-v2 traces instead of measured loss
    qat-sensitivity measure=true logger=csv                   # PTQ-measure every plan too; figures to the CSV folder
    qat-sensitivity budget_unit=bytes budgets=[3000]          # a budget in bytes of quantized weights
    qat-sensitivity model._target_=mymodel.MyModule data._target_=mymodel.MyData metric=val_loss mode=min

The ``model`` / ``data`` / ``trainer`` / ``quant`` / ``logger`` groups and ``seed``, ``module_attr``,
``metric``, ``mode``, ``fp.*``, ``ptq.*`` keys are ``qat-train``'s: the float model is the one
``qat-train`` trains (``fp.epochs`` with the same seed; or ``checkpoint=<fp_model.pt>`` of a
``qat-train`` run). The loss whose increase is the damage is the model's own ``training_step``
loss on ``sensitivity.calibration_batches`` training batches.

What it writes to the run directory: ``sensitivity.json`` (the table), ``pareto.json`` / ``pareto.md``,
``quant/<base>_mp_<budget>.yaml`` (one allocated preset per budget, one rule per changed layer with
a comment saying why) and ``quant/<base>_u_<option>.yaml`` (the base plan at each candidate
bit-width: the uniform plans to compare with). To the logger: the damage heat map
(``sensitivity/damage``), the Pareto plot (``sensitivity/pareto``) and table. It ends by printing
the ``qat-train -m`` command that trains QAT on every allocated and uniform plan (the ``quant/``
folder put on Hydra's search path), whose sweep ends with ``pareto.png``.

From Python: :func:`run` with a composed config, or the core pieces
(:func:`qat.sensitivity.bit_sensitivity`, :meth:`qat.sensitivity.SensitivityTable.allocate`,
:func:`qat.allocate.write_preset`).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from qat import QATConfigError, QuantPlan, load_plan, prepare
from qat.allocate import SOLVERS, write_preset
from qat.callbacks.loggers import close_logger, log_figure, stage_logger_kwargs
from qat.ptq import default_forward
from qat.sensitivity import METHODS, BitOption, SensitivityTable, bit_sensitivity
from qat.size import float_size_bytes, model_size_bytes

from .atomic import check_checkpoint_file, save_torch, write_json
from .config import FloatStartConfig, build_trainer, check_int, check_output_dir, instantiate_node, validate_train_config
from .progress import calibrate, progress_enabled, track

__all__ = ["SensitivityStage", "SensitivityConfig", "register_sensitivity_configs", "validate_sensitivity_config",
           "run", "main", "uniform_plan", "BUDGET_UNITS"]

log = logging.getLogger(__name__)

#: the values of ``budget_unit``
BUDGET_UNITS = ("avg_bits", "bytes")


@dataclass
class SensitivityStage:
    """How the sensitivity is measured.

    Args:
        method: ``measured`` (loss change with one layer quantized) or ``hessian`` (HAWQ-v2 trace x noise).
        candidates: the options every layer may get (``w<bits>a<bits>``).
        calibration_batches: training batches for calibration and the loss.
        probes: Hutchinson probe vectors a batch (``hessian``).
        cache: directory of cached tables (``false``: off); a run with the same model, data, plan
            and candidates reads its table from there.

    Example::

        >>> SensitivityStage().candidates
        ['w2a4', 'w3a4', 'w4a4', 'w8a8']
    """

    method: str = "measured"
    candidates: list = field(default_factory=lambda: ["w2a4", "w3a4", "w4a4", "w8a8"])
    calibration_batches: int = 4
    probes: int = 16
    cache: Any = "outputs/sensitivity/cache"


@dataclass
class SensitivityConfig(FloatStartConfig):
    """The top level of ``configs/sensitivity.yaml`` (``sensitivity_schema``):
    :class:`qat.recipes.config.FloatStartConfig`'s keys and its own.

    ``budgets`` are average weight bits (``budget_unit: avg_bits``) or bytes of quantized weights
    (``bytes``); ``solver`` is :func:`qat.allocate.allocate`'s; ``measure`` PTQ-evaluates every
    plan (``metric`` on the model's test or validation loop); ``preset_dir`` is where the presets
    go (``null``: ``<run dir>/quant``).

    Example::

        >>> SensitivityConfig().budgets
        [3.0, 4.0]
    """

    metric: str = "test/acc"
    mode: str = "max"
    sensitivity: SensitivityStage = field(default_factory=SensitivityStage)
    budgets: list = field(default_factory=lambda: [3.0, 4.0])
    budget_unit: str = "avg_bits"
    solver: str = "auto"
    measure: bool = False
    preset_dir: Optional[str] = None


def register_sensitivity_configs() -> None:
    """Register ``sensitivity_schema`` (and ``qat-train``'s schemas) in Hydra's ConfigStore.

    Example::

        >>> from hydra.core.config_store import ConfigStore
        >>> register_sensitivity_configs()
        >>> "sensitivity_schema.yaml" in ConfigStore.instance().list("")
        True
    """
    from .config import register_configs

    register_configs(sensitivity_schema=SensitivityConfig)


def validate_sensitivity_config(cfg: DictConfig) -> None:
    """Check every value before any work: ``qat-train``'s shared keys
    (:func:`qat.recipes.config.validate_train_config`), ``sensitivity.*``, ``budgets`` /
    ``budget_unit``, ``solver``, ``measure`` and ``progress``.

    Raises:
        QATConfigError: naming the key and its valid values.

    Example::

        >>> cfg = OmegaConf.structured(SensitivityConfig)
        >>> validate_sensitivity_config(cfg)
        >>> cfg.sensitivity.method = "fisher"
        >>> validate_sensitivity_config(cfg)
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: sensitivity.method must be one of ['measured', 'hessian'], got 'fisher'
    """
    validate_train_config(cfg)
    s = cfg.sensitivity
    if s.method not in METHODS:
        raise QATConfigError(f"sensitivity.method must be one of {list(METHODS)}, got {s.method!r}")
    check_int(s.calibration_batches, "sensitivity.calibration_batches", 1)
    check_int(s.probes, "sensitivity.probes", 1)
    try:
        [BitOption.parse(c) for c in s.candidates]
    except QATConfigError as exc:
        raise QATConfigError(f"sensitivity.{exc}") from None
    if not (s.cache is False or s.cache is None or (isinstance(s.cache, str) and s.cache)):
        raise QATConfigError(f"sensitivity.cache must be a directory or false (off), got {s.cache!r}")
    if cfg.budget_unit not in BUDGET_UNITS:
        raise QATConfigError(f"budget_unit must be one of {list(BUDGET_UNITS)}, got {cfg.budget_unit!r}")
    if not cfg.budgets:
        raise QATConfigError("budgets is empty; give at least one (e.g. budgets=[3,4] average weight bits)")
    for b in cfg.budgets:
        if isinstance(b, bool) or not isinstance(b, (int, float)) or b <= 0:
            raise QATConfigError(f"budgets: each must be a number > 0 ({cfg.budget_unit}), got {b!r}")
        if cfg.budget_unit == "bytes" and int(b) != b:
            raise QATConfigError(f"budgets: bytes must be whole numbers, got {b!r}")
    if cfg.solver not in SOLVERS:
        raise QATConfigError(f"solver must be one of {list(SOLVERS)}, got {cfg.solver!r}")
    if not isinstance(cfg.measure, bool):
        raise QATConfigError(f"measure must be true or false, got {cfg.measure!r}")
    progress_enabled(cfg.get("progress"))


def uniform_plan(base: Any, option: Any, name: str) -> QuantPlan:
    """The base plan with every ``bits`` field of its rules set to ``option``'s (weights, and
    inputs when the option names them): the uniform plan of the same quantizer settings.

    Example::

        >>> p = uniform_plan("w2a4", "w3a8", "w2a4_u_w3a8")
        >>> p.rules[0].weight["bits"], p.rules[0].input["bits"], p.rules[0].weight["estimator"]
        (3, 8, 'lsq')
    """
    opt = BitOption.parse(option)
    rules = []
    for r in load_plan(base).to_dict()["rules"]:
        r = dict(r)
        if isinstance(r.get("weight"), dict) and "bits" in r["weight"]:
            r["weight"] = {**r["weight"], "bits": opt.weight}
        if opt.input is not None and isinstance(r.get("input"), dict) and "bits" in r["input"]:
            r["input"] = {**r["input"], "bits": opt.input}
        rules.append(r)
    return QuantPlan.from_dict({"name": name, "rules": rules})


def _budget_label(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{int(value)}B"
    return f"{value:g}".replace(".", "p")  # Hydra option names: 2.5 -> 2p5


def _loss_fn(module: Any, module_attr: Optional[str]):
    """``(net, batch) -> loss``: the LightningModule's ``training_step`` loss with ``net`` in its place."""

    def loss(net: torch.nn.Module, batch: Any) -> torch.Tensor:
        holder = module if module_attr is not None else net
        old = getattr(module, module_attr) if module_attr is not None else None
        if module_attr is not None:
            setattr(module, module_attr, net)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here: nothing to log to
                out = holder.training_step(batch, 0)
        finally:
            if module_attr is not None:
                setattr(module, module_attr, old)
        out = out["loss"] if isinstance(out, dict) else out
        if not isinstance(out, torch.Tensor):
            raise QATConfigError(f"model: {type(module).__name__}.training_step returned {type(out).__name__}, not a loss "
                                 "tensor (or a dict with 'loss'); qat-sensitivity measures that loss")
        return out

    return loss


def _evaluate(cfg: DictConfig, module: Any, dm: Any, output_dir: str) -> float:
    """``cfg.metric`` of ``module`` from its test loop, else its validation loop."""
    errors = []
    for loop in ("test", "validate"):
        trainer = build_trainer(cfg, 1, False, [], output_dir, model=module)
        try:
            out = getattr(trainer, loop)(module, datamodule=dm, verbose=False)
        except Exception as exc:  # a model or data module without that loop
            errors.append(f"{loop}: {type(exc).__name__}")
            continue
        merged = {k: v for d in out for k, v in d.items()}
        if cfg.metric in merged:
            return float(merged[cfg.metric])
        errors.append(f"{loop}: logs {sorted(merged)}")
    raise QATConfigError(f"metric={cfg.metric!r}: the model does not log it ({'; '.join(errors)}); set metric=<one of them>")


def run(cfg: DictConfig, output_dir: Optional[str] = None) -> dict[str, Any]:
    """Float model -> sensitivity table -> one allocation per budget -> presets, Pareto table, figures.

    Returns (and writes to ``pareto.json``) ``{"table": <sensitivity.json path>, "presets": {name:
    path}, "rows": [...], "command": <the qat-train sweep>}``; each row is one plan: ``kind``
    (``allocated`` / ``uniform``), ``avg_bits``, ``weight_bytes``, ``model_bytes``,
    ``predicted_damage`` (summed loss increase), ``predicted_loss`` and, with ``measure``,
    ``measured`` (the PTQ ``metric``).

    Example (it trains a float model, so it is not run as a doctest;
    ``tests/recipes/test_sensitivity_recipe.py`` runs this call and checks what it writes)::

        >>> import tempfile
        >>> from hydra import compose, initialize_config_module
        >>> register_sensitivity_configs()
        >>> with initialize_config_module("qat.configs", version_base="1.3"):
        ...     cfg = compose("sensitivity", ["logger=none", "fp.epochs=1", "model.net.channels=4",
        ...                                   "sensitivity.calibration_batches=1", "sensitivity.cache=false"])
        >>> res = run(cfg, tempfile.mkdtemp())  # doctest: +SKIP
        >>> sorted(res["presets"])[:2], res["rows"][0]["kind"]  # doctest: +SKIP
        (['w2a4_mp_3', 'w2a4_mp_4'], 'allocated')
    """
    output_dir = os.path.abspath(output_dir or os.getcwd())
    validate_sensitivity_config(cfg)
    check_output_dir(output_dir, overwrite=bool(cfg.get("overwrite")))
    bars = progress_enabled(cfg.get("progress"))
    base = load_plan(cfg.quant)
    from .train import resolve_module_attr

    pl.seed_everything(cfg.seed, workers=True)
    fp, _ = instantiate_node(cfg.model, "model", ("LightningModule",), lr=cfg.fp.lr)
    module_attr = resolve_module_attr(fp, cfg.get("module_attr"))
    net = fp if module_attr is None else getattr(fp, module_attr)
    base.resolve(net)  # a plan that does not fit the model fails here
    if cfg.checkpoint is not None and not os.path.isfile(cfg.checkpoint):
        raise QATConfigError(f"checkpoint {cfg.checkpoint!r} does not exist; give a float state_dict (.pt) or checkpoint=null")
    options = [BitOption.parse(c) for c in cfg.sensitivity.candidates]
    os.makedirs(output_dir, exist_ok=True)
    t0 = time.time()
    dm, _ = instantiate_node(cfg.data, "data", ("LightningDataModule",))
    dm.prepare_data()
    dm.setup("fit")
    if cfg.checkpoint is not None:
        check_checkpoint_file(cfg.checkpoint, "checkpoint")
        state = torch.load(cfg.checkpoint, map_location="cpu", weights_only=True)
        fp.load_state_dict(state.get("state_dict", state))
    else:
        build_trainer(cfg, cfg.fp.epochs, False, [], output_dir, model=fp).fit(fp, datamodule=dm)
        save_torch(fp.state_dict(), os.path.join(output_dir, "fp_model.pt"))
    fp_state = {k: v.detach().clone() for k, v in fp.state_dict().items()}

    def fresh() -> Any:
        """The float model again, attached to no Trainer (its training_step's self.log is then a no-op)."""
        m = instantiate_node(cfg.model, "model", ("LightningModule",), quiet=True, lr=cfg.fp.lr)[0]
        m.load_state_dict(fp_state)
        return m.eval()

    fp = fresh()
    net = fp if module_attr is None else getattr(fp, module_attr)
    batches = [b for b, _ in zip(dm.train_dataloader(), range(cfg.sensitivity.calibration_batches))]
    cache = cfg.sensitivity.cache or None
    table = bit_sensitivity(
        net, base, batches, options, _loss_fn(fp, module_attr), method=cfg.sensitivity.method,
        probes=cfg.sensitivity.probes, seed=cfg.seed, cache_dir=os.path.abspath(cache) if cache else None,
        progress=lambda items, desc, total: track(items, desc, total, enabled=bars, unit="step"),
    )
    table_path = os.path.join(output_dir, "sensitivity.json")
    write_json(table.to_dict(), table_path)

    preset_dir = os.path.abspath(cfg.preset_dir or os.path.join(output_dir, "quant"))
    plans: list[tuple[str, str, Optional[float], dict[str, int], QuantPlan]] = []
    for b in cfg.budgets:
        kw = {"bytes": int(b)} if cfg.budget_unit == "bytes" else {"avg_bits": float(b)}
        alloc = table.allocate(solver=cfg.solver, **kw)
        name = f"{base.name}_mp_{_budget_label(b, cfg.budget_unit)}"
        plans.append(("allocated", name, float(b), alloc.choice, table.to_plan(alloc.choice, name)))
    for o in options:
        name = f"{base.name}_u_{o.label}"
        plans.append(("uniform", name, None, table.uniform(o), uniform_plan(base, o, name)))

    presets, rows = {}, []
    for kind, name, budget, choice, plan in plans:
        s = table.summary(choice)
        if kind == "allocated":
            unit = "average weight bits" if cfg.budget_unit == "avg_bits" else "bytes of quantized weights"
            header = [f"{name}: qat-sensitivity's least damaging plan within {budget:g} {unit} "
                      f"(base {base.name}, candidates {[o.label for o in options]}, method {table.method}).",
                      f"Average weight bits {s['avg_bits']:.3f}; predicted damage (loss increase) {s['damage']:.4g}.",
                      "One rule per layer whose bits differ from the base plan; the comment gives its damage at each option."]
            why = table.reasons(choice)
        else:
            header = [f"{name}: the base plan {base.name} with every layer at {options[choice[table.layers[0]]].label} "
                      f"(predicted damage {s['damage']:.4g}): the uniform plan to compare the allocations with."]
            why = None
        presets[name] = write_preset(os.path.join(preset_dir, f"{name}.yaml"), plan, header, why)
        qnet = prepare(copy.deepcopy(net), plan)
        rows.append({"plan": name, "kind": kind, "budget": budget, "avg_bits": s["avg_bits"],
                     "weight_bytes": s["weight_bytes"], "model_bytes": model_size_bytes(qnet),
                     "predicted_damage": s["damage"], "predicted_loss": table.base_loss + s["damage"],
                     "bits": {n: table.options[choice[n]].label for n in table.layers}})
    if cfg.measure:
        for row, (_, _, _, _, plan) in zip(rows, plans):
            module = fresh()
            qnet = module if module_attr is None else getattr(module, module_attr)
            prepare(qnet, plan)
            calibrate(qnet, dm.train_dataloader(), num_batches=cfg.ptq.calibration_batches, enabled=bars,
                      description=f"calibration {row['plan']}", forward_fn=default_forward)
            row["measured"] = _evaluate(cfg, module, dm, output_dir)
        fp_metric = _evaluate(cfg, fp, dm, output_dir)
    else:
        fp_metric = None
    result = {"table": table_path, "presets": presets, "rows": rows, "metric": cfg.metric, "mode": cfg.mode,
              "fp": {"loss": table.base_loss, "metric": fp_metric, "bytes": float_size_bytes(net)},
              "preset_dir": preset_dir, "seconds": round(time.time() - t0, 1), "output_dir": output_dir}
    result["command"] = sweep_command(preset_dir, list(presets))
    write_json(result, os.path.join(output_dir, "pareto.json"))
    with open(os.path.join(output_dir, "pareto.md"), "w") as f:
        f.write(_markdown(result, table))
    _log(cfg, output_dir, result, table)
    _print(result, table)
    return result


def sweep_command(preset_dir: str, names: list[str]) -> str:
    """The ``qat-train`` multirun that trains QAT on each preset of ``preset_dir`` (a ``quant/``
    folder, its parent put on Hydra's search path).

    Example::

        >>> sweep_command("/tmp/run/quant", ["a_mp_3", "a_u_w3a4"])
        "qat-train -m 'hydra.searchpath=[file:///tmp/run]' quant=a_mp_3,a_u_w3a4"
    """
    parent = os.path.dirname(os.path.abspath(preset_dir))
    if os.path.basename(os.path.abspath(preset_dir)) != "quant":
        raise QATConfigError(f"preset_dir={preset_dir!r}: Hydra finds quant=<name> in a folder named quant; end it with /quant")
    return f"qat-train -m 'hydra.searchpath=[file://{parent}]' quant={','.join(names)}"


def _markdown(result: dict[str, Any], table: SensitivityTable) -> str:
    measured = any("measured" in r for r in result["rows"])
    lines = [f"# qat-sensitivity: {table.method} damage, base plan {table.plan.get('name')}", "",
             "| plan | kind | avg weight bits | model bytes | predicted damage | predicted loss |"
             + (f" PTQ {result['metric']} |" if measured else ""),
             "|---|---|---:|---:|---:|---:|" + ("---:|" if measured else "")]
    for r in result["rows"]:
        lines.append(f"| {r['plan']} | {r['kind']} | {r['avg_bits']:.3f} | {r['model_bytes']} | {r['predicted_damage']:.4g} | "
                     f"{r['predicted_loss']:.4g} |" + (f" {r['measured']:.4f} |" if measured else ""))
    lines += ["", "Damage per layer (loss increase) at each option:", "",
              "| layer | weights | " + " | ".join(o.label for o in table.options) + " |",
              "|---|---:|" + "---:|" * len(table.options)]
    for n in table.layers:
        lines.append(f"| {n} | {table.numel[n]} | " + " | ".join(f"{d:.3g}" for d in table.damage[n]) + " |")
    return "\n".join(lines) + "\n\nTrain them: `" + result["command"] + "`\n"


def _figures(result: dict[str, Any], table: SensitivityTable) -> dict[str, Any]:
    """``{key: matplotlib figure}``: the damage heat map and the Pareto plot; ``{}`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        log.info("matplotlib not installed: no sensitivity figures (pip install 'lightning-qat[recipes]')")
        return {}
    dmg = np.array([table.damage[n] for n in table.layers], dtype=float)  # (layers, options)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(table.options), 1.0 + 0.32 * len(table.layers)))
    shown = np.log10(np.clip(dmg, 1e-8, None))
    im = ax.imshow(shown, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(table.options)), [o.label for o in table.options])
    ax.set_yticks(range(len(table.layers)), list(table.layers), fontsize=7)
    for i in range(dmg.shape[0]):
        for j in range(dmg.shape[1]):
            ax.text(j, i, f"{dmg[i, j]:.2g}", ha="center", va="center", fontsize=6, color="gray")
    fig.colorbar(im, ax=ax, label="log10 damage (loss increase)")
    ax.set_title(f"sensitivity ({table.method})")
    heat = fig
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for kind, marker in (("uniform", "o"), ("allocated", "*")):
        rows = [r for r in result["rows"] if r["kind"] == kind]
        ax.scatter([r["model_bytes"] / 1024 for r in rows], [r["predicted_damage"] for r in rows], marker=marker,
                   s=60 if marker == "*" else 30, label=f"{kind} (predicted)")
        for r in rows:
            ax.annotate(r["plan"], (r["model_bytes"] / 1024, r["predicted_damage"]), fontsize=6)
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("model size (KiB)")
    ax.set_ylabel("predicted damage (loss increase)")
    if any("measured" in r for r in result["rows"]):
        ax2 = ax.twinx()
        for kind, marker in (("uniform", "s"), ("allocated", "P")):
            rows = [r for r in result["rows"] if r["kind"] == kind]
            ax2.scatter([r["model_bytes"] / 1024 for r in rows], [r["measured"] for r in rows], marker=marker, color="C3",
                        alpha=0.7, label=f"{kind} (PTQ {result['metric']})")
        ax2.set_ylabel(f"PTQ {result['metric']}")
        ax2.legend(fontsize=6, loc="lower right")
    ax.legend(fontsize=6, loc="upper right")
    ax.set_title("allocated vs uniform plans")
    return {"sensitivity/damage": heat, "sensitivity/pareto": fig}


def _log(cfg: DictConfig, output_dir: str, result: dict[str, Any], table: SensitivityTable) -> None:
    if not cfg.get("logger"):
        for key, fig in _figures(result, table).items():  # no logger: the PNGs beside the results
            fig.savefig(os.path.join(output_dir, key.replace("/", "_") + ".png"), dpi=100, bbox_inches="tight")
            import matplotlib.pyplot as plt

            plt.close(fig)
        return
    group = f"{os.path.basename(output_dir.rstrip(os.sep)) or 'run'}-sensitivity"
    logger = instantiate(cfg.logger, **stage_logger_kwargs(str(cfg.logger.get("_target_", "")), "sensitivity", group))
    logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    for key, fig in _figures(result, table).items():
        log_figure([logger], key, fig)
    columns = ["plan", "kind", "avg_bits", "model_bytes", "predicted_damage", "predicted_loss", "measured"]
    if hasattr(logger, "log_table"):
        logger.log_table(key="sensitivity/pareto_table", columns=columns,
                         data=[[r.get(c) for c in columns] for r in result["rows"]])
    for i, r in enumerate(result["rows"]):
        logger.log_metrics({f"pareto/{r['plan']}/{k}": r[k] for k in columns[2:] if r.get(k) is not None}, step=i)
    close_logger(logger)


def _print(result: dict[str, Any], table: SensitivityTable) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"qat-sensitivity ({table.method}): predicted damage against size")
    measured = any("measured" in r for r in result["rows"])
    for col in ("plan", "kind", "avg bits", "size (KiB)", "pred. damage") + ((f"PTQ {result['metric']}",) if measured else ()):
        t.add_column(col, justify="left" if col in ("plan", "kind") else "right")
    for r in result["rows"]:
        t.add_row(r["plan"], r["kind"], f"{r['avg_bits']:.2f}", f"{r['model_bytes'] / 1024:.2f}", f"{r['predicted_damage']:.4g}",
                  *((f"{r['measured']:.4f}",) if measured else ()))
    Console(width=110).print(t)
    print(f"presets: {result['preset_dir']}\ntrain them: {result['command']}")


def _task(cfg: DictConfig) -> None:
    run(cfg, HydraConfig.get().runtime.output_dir)


def main() -> None:
    """Console entry point ``qat-sensitivity`` (Hydra app over ``configs/sensitivity.yaml``).

    Example::

        >>> import subprocess, sys
        >>> out = subprocess.run([sys.executable, "-m", "qat.recipes.sensitivity", "--help"], capture_output=True, text=True)
        >>> "sensitivity" in out.stdout
        True
    """
    cwd = os.path.abspath(os.getcwd())
    added = cwd not in (os.path.abspath(p or os.curdir) for p in sys.path)
    if added:  # model._target_=mymodel.MyModule finds ./mymodel.py, as in qat-train
        sys.path.insert(0, cwd)
    try:
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
        register_sensitivity_configs()
        hydra.main(version_base="1.3", config_path="../configs", config_name="sensitivity")(_task)()
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


if __name__ == "__main__":
    main()
