"""Whole-model QAT training-step cost: float against lightning-qat (fused CuPy kernels and the
PyTorch reference ops) against torchao's QAT, in eager, ``torch.compile`` and CUDA-graph modes.

    python benchmarks/train_step.py                              # small decoder, all rows and modes, via prepare
    python benchmarks/train_step.py --via prepare,trainer --modes eager
    python benchmarks/train_step.py --device cpu --model tiny --steps 2 --modes eager   # CPU smoke run
    python benchmarks/train_step.py --merge a.json b.json --tag h200 --note "..."        # one table of several runs
    python benchmarks/train_step.py --vocab 50304                                        # nanoGPT's padded vocabulary

Prints a markdown table and writes ``<out>/train_step_<gpu>.md`` and ``.json`` (``--tag`` names
``<gpu>``), rewritten after every configuration, so a run cut short keeps what it measured.

The model is a nanoGPT-style decoder written here (token + position embeddings, pre-LN blocks,
causal ``F.scaled_dot_product_attention``, a 4x GELU MLP, an LM head tied to the token embedding);
``--model small`` is GPT-2 small (124M), ``medium`` GPT-2 medium (350M), ``1b`` 24 layers of
d=2048 (1.3B), ``tiny`` a 2-layer d=128 toy for the CPU. The vocabulary is GPT-2's 50257 unless
``--vocab`` says otherwise: 50257 leaves the tied head's GEMMs unaligned, which costs eager cuBLAS
~30 ms of a 68 ms float step on an H200 (see ``results/train_step_h200.md``); 50304 does not. The step: bf16 autocast, fused AdamW
(on CUDA), ``backward``, ``step``, ``zero_grad(set_to_none=True)``.

Rows (``--rows``):

* ``float``: no quantization.
* ``ste`` / ``lsq``: ``qat.prepare`` with :data:`PLAN` (every ``nn.Linear``, the tied LM head
  included: int4 symmetric per-group-128 weights with the STE or LSQ estimator, int8 asymmetric
  dynamic per-token inputs): in eager mode on the fused CuPy kernels, under ``torch.compile`` on
  the product's default compile route (``qat.kernels.compile_route()``, ``QAT_COMPILE_ROUTE``).
* ``ste_kern`` / ``lsq_kern``: ``ste`` / ``lsq`` on the compile route ``"kernel"``: the fused
  kernels as opaque custom ops inside the compiled graph.
* ``ste_ind`` / ``lsq_ind``: ``ste`` / ``lsq`` on the compile route ``"inductor"``: every
  fake-quant op (dynamic per-token range, observers, qparams, quantize, mask; LSQ's and PACT's
  forward and backward) traced as PyTorch ops for Inductor to fuse into their neighbours. Eager
  mode is the same for all three pairs.
* ``ste_ref``: ``ste`` with the ops on their PyTorch reference (``QAT_KERNELS=reference``; the ops
  module's cached backend choice is cleared before and after this row).
* ``torchao``: ``torchao.quantization.quantize_(model, QATConfig(...))`` with the same bit-widths
  and granularities (int4 symmetric groups of 128, int8 asymmetric per token), if torchao imports.

Ways in (``--via``): ``prepare``, the bare module and a hand-written loop; ``trainer``, a
``LightningModule`` in ``Trainer(precision="bf16-mixed")`` with the ``QuantizationAwareTraining``
callback (only its first argument, the plan; torchao's QAT is applied in ``configure_model``),
``torch.compile`` applied to the module's model in ``configure_model``, steps timed by a callback.

Modes (``--modes``): ``eager``; ``compile`` (``torch.compile`` default); ``cudagraphs``
(``torch.compile(mode="reduce-overhead")``). The optimizer step stays eager in every mode.

Per configuration: the median step time of ``--steps`` timed steps after ``--warmup`` steps
(CUDA events at step boundaries, so a step is the period of the loop, host gaps included),
``torch.cuda.max_memory_allocated`` (reset before the model is built), the warm-up wall time
(first ``--warmup`` steps, compilation of kernels and graphs included), the host's time per step
(``time.perf_counter`` from a step's start until the host returns from it, and
``time.process_time`` over the timed steps: all threads' CPU time), in eager mode a
``torch.profiler`` pass over ``--profile-steps`` steps (self CPU total against self GPU total, and
the ops and kernels that take the most), and under ``torch.compile`` dynamo's graph-break count,
recompiles (guard failures), compiled graphs, graphs compiled after the first step, and
Inductor's CUDA-graph skips.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
ALL_ROWS = ("float", "ste", "lsq", "ste_unfused", "lsq_unfused", "ste_kern", "lsq_kern", "ste_ind", "lsq_ind", "ste_ref", "torchao")
ALL_MODES = ("eager", "compile", "cudagraphs")
ROW_LABELS = {
    "float": "float",
    "ste": "ours, STE weights",
    "lsq": "ours, LSQ weights",
    "ste_unfused": "ours, STE weights (eager: QuantLinear unfused)",
    "lsq_unfused": "ours, LSQ weights (eager: QuantLinear unfused)",
    "ste_kern": "ours, STE weights (compile route 'kernel')",
    "lsq_kern": "ours, LSQ weights (compile route 'kernel')",
    "ste_ind": "ours, STE weights (compile route 'inductor')",
    "lsq_ind": "ours, LSQ weights (compile route 'inductor')",
    "ste_ref": "ours, STE weights (reference ops)",
    "torchao": "torchao QAT",
}
MODE_LABELS = {"eager": "eager", "compile": "torch.compile", "cudagraphs": 'compile "reduce-overhead"'}


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int
    d: int
    n_head: int
    vocab: int = 50257
    ctx: int = 1024
    batch: int = 16  # default batch and sequence for this size
    seq: int = 1024


MODELS = {
    "tiny": GPTConfig(n_layer=2, d=128, n_head=4, vocab=512, ctx=64, batch=2, seq=64),
    "small": GPTConfig(n_layer=12, d=768, n_head=12),  # GPT-2 small, 124M
    "medium": GPTConfig(n_layer=24, d=1024, n_head=16),  # GPT-2 medium, 350M
    "1b": GPTConfig(n_layer=24, d=2048, n_head=16, batch=8),  # 1.3B
}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.d, 3 * cfg.d)
        self.proj = nn.Linear(cfg.d, cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d, 4 * cfg.d)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * cfg.d, cfg.d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """nanoGPT-style decoder; ``forward(idx, targets)`` returns the mean cross-entropy."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab, cfg.d)
        self.pos_emb = nn.Embedding(cfg.ctx, cfg.d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d)
        self.lm_head = nn.Linear(cfg.d, cfg.vocab, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # tied
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def tie(self) -> bool:
        """Re-tie the head to the embedding if a quantizer swapped its weight; True if it had to."""
        head = self.lm_head
        if getattr(head, "weight", None) is self.tok_emb.weight:
            return False
        head.weight = self.tok_emb.weight
        return True

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- quantization


def plan(estimator: str) -> dict:
    """The plan of the issue: every Linear, int4 symmetric per-group-128 weights (``estimator``),
    int8 asymmetric dynamic per-token inputs."""
    return {
        "name": f"w4g128_{estimator}_a8_per_token",
        "rules": [
            {
                "match": "*",
                "types": ["Linear"],
                "weight": {"bits": 4, "granularity": "per_group", "group_size": 128, "estimator": estimator},
                "input": {"bits": 8, "signed": False, "symmetric": False, "granularity": "per_token", "dynamic": True},
            }
        ],
    }


ROW_PLAN = {"ste": "ste", "lsq": "lsq", "ste_unfused": "ste", "lsq_unfused": "lsq", "ste_kern": "ste", "lsq_kern": "lsq", "ste_ind": "ste", "lsq_ind": "lsq", "ste_ref": "ste"}
# the compile route of each row (qat.kernels.set_compile_route): ste / lsq take the product's
# default; *_kern call the fused kernels as opaque ops, *_ind trace the fake-quant math for
# Inductor to fuse. In eager mode all of them run the fused kernels.
ROW_ROUTE = {"ste_kern": "kernel", "lsq_kern": "kernel", "ste_ind": "inductor", "lsq_ind": "inductor"}


def set_kernel_backend(name: str, device: torch.device) -> str:
    """Make ``qat.kernels.ops`` pick ``name`` ("cupy" or "reference") for CUDA tensors; returns the
    backend it reports for ``device``. The ops cache their choice; the cache is cleared here."""
    from qat.kernels import ops

    if name == "reference":
        os.environ["QAT_KERNELS"] = "reference"
    else:
        os.environ.pop("QAT_KERNELS", None)
    clear = getattr(getattr(ops, "_cupy_backend", None), "cache_clear", None)
    if clear is not None:
        clear()
    return ops.backend_name(device)


def torchao_available() -> Optional[str]:
    try:
        import torchao  # noqa: F401
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig  # noqa: F401
    except Exception as exc:  # torchao missing, or built for another torch
        return f"{type(exc).__name__}: {exc}"
    return None


def torchao_prepare(model: nn.Module) -> None:
    """torchao's QAT with the same bit-widths: int4 symmetric groups of 128, int8 asymmetric per token."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    wcfg = IntxFakeQuantizeConfig(torch.int4, group_size=128, is_symmetric=True)
    acfg = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    quantize_(model, QATConfig(activation_config=acfg, weight_config=wcfg, step="prepare"))


# --------------------------------------------------------------------------- measuring helpers


def _default_route() -> str:
    from qat.kernels import compile_route

    return compile_route()


DEFAULT_ROUTE = _default_route()  # QAT_COMPILE_ROUTE or the ops' default, read before any row sets one


def set_route(route: str) -> str:
    """``qat.kernels.set_compile_route(route)``; returns the route now in effect."""
    from qat.kernels import compile_route, set_compile_route

    set_compile_route(route)
    return compile_route()


def set_fused_linear(enabled: bool) -> None:
    """``qat.modules.set_fused_linear``: the ``*_unfused`` rows time QuantLinear's three-node graph."""
    from qat.modules import set_fused_linear as _set

    _set(enabled)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compile_kwargs(mode: str) -> Optional[dict]:
    return {"eager": None, "compile": {}, "cudagraphs": {"mode": "reduce-overhead"}}[mode]


_KERNEL_COMPILE_S = [0.0]


def time_kernel_compiles() -> None:
    """Add the wall time of the CuPy backend's kernel builds (NVRTC, at a kernel's first launch) to
    ``_KERNEL_COMPILE_S``: the part of a warm-up that is ours alone."""
    try:
        from qat.kernels import cupy_backend as cb
    except ImportError:
        return
    build = cb._kernel
    if getattr(build, "timed", False):
        return

    def timed(*a):
        t = time.perf_counter()
        try:
            return build(*a)
        finally:
            _KERNEL_COMPILE_S[0] += time.perf_counter() - t

    timed.timed = True
    cb._kernel = timed


#: torch.compile's timed phases the warm-up table names (dynamo's compilation_time_metrics; they nest):
#: the whole compile of a frame, AOTAutograd (which includes Inductor), Inductor's lowering and code
#: generation of the forward / backward graph, the wait for the Triton kernels' compiles, the backward
WARMUP_PHASES = {
    "_compile.compile_inner": "dynamo",
    "create_aot_dispatcher_function": "aot",
    "GraphLowering.codegen": "codegen",
    "async_compile.wait": "triton_wait",
    "compile_fx.<locals>.bw_compiler": "bw_compile",
}


def prewarm_compiler(device: torch.device, lightning: bool) -> float:
    """Pay the process's one-time compile costs before the first row (Inductor's and Triton's imports
    and initialization, the compile workers' start; Lightning's import): otherwise the first row's
    warm-up holds them, and its ratio to float's is off by seconds. Returns the seconds it took."""
    t0 = time.perf_counter()
    if lightning:
        import pytorch_lightning  # noqa: F401
    torch._dynamo.reset()
    net = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)).to(device)
    fn = torch.compile(net)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        loss = fn(torch.randn(8, 64, device=device)).float().square().mean()
    loss.backward()
    sync(device)
    torch._dynamo.reset()
    return round(time.perf_counter() - t0, 2)


def warmup_parts() -> dict:
    """Seconds of the warm-up by part: the CuPy kernel builds, and torch.compile's main phases
    (:data:`WARMUP_PHASES`; nested, so they do not add up)."""
    from torch._dynamo.utils import compilation_time_metrics

    parts = {"kernel_builds": round(_KERNEL_COMPILE_S[0], 2)}
    for key, name in WARMUP_PHASES.items():
        if key in compilation_time_metrics:
            parts[name] = round(sum(compilation_time_metrics[key]), 2)
    return parts


def reset_state(device: torch.device) -> None:
    torch._dynamo.reset()
    from torch._dynamo.utils import compilation_time_metrics, counters, guard_failures

    counters.clear()
    guard_failures.clear()
    compilation_time_metrics.clear()
    _KERNEL_COMPILE_S[0] = 0.0
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def dynamo_stats() -> dict:
    from torch._dynamo.utils import counters, guard_failures

    breaks = counters.get("graph_break", {})
    reasons = sorted(breaks.items(), key=lambda kv: -kv[1])[:8]
    recompile_reasons = [str(r)[:300] for v in guard_failures.values() for r in v]
    return {
        "graph_breaks": int(sum(breaks.values())),
        "graph_break_reasons": [[str(k)[:300], int(v)] for k, v in reasons],
        "recompiles": len(recompile_reasons),
        "recompile_reasons": recompile_reasons[:8],
        "unique_graphs": int(counters.get("stats", {}).get("unique_graphs", 0)),
        "cudagraph_skips": int(counters.get("inductor", {}).get("cudagraph_skips", 0)),
    }


def summarize_steps(ms: list[float]) -> dict:
    srt = sorted(ms)
    return {
        "step_ms": statistics.median(ms),
        "step_ms_min": srt[0],
        "step_ms_p90": srt[min(len(srt) - 1, int(round(0.9 * (len(srt) - 1))))],
        "step_ms_all": [round(v, 3) for v in ms],
    }


def profile_steps(step: Callable[[int], None], k: int, device: torch.device) -> dict:
    """Self CPU and self GPU time per step over ``k`` profiled steps, with the top ops of each."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for i in range(k):
            step(i)
        sync(device)
    ka = prof.key_averages()
    cuda = torch.autograd.DeviceType.CUDA
    # Device time: the kernel / memcpy rows only (an op row's self device time is the same kernels
    # again). Host time: the CPU rows, less the wait in cudaDeviceSynchronize (the final sync).
    kernels = [e for e in ka if e.device_type == cuda]
    ops = [e for e in ka if e.device_type != cuda]

    def dev(e) -> float:
        return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

    sync_us = sum(e.self_cpu_time_total for e in ops if e.key == "cudaDeviceSynchronize")
    cpu = (sum(e.self_cpu_time_total for e in ops) - sync_us) / k / 1e3
    gpu = sum(dev(e) for e in kernels) / k / 1e3
    top_gpu = sorted(kernels, key=dev, reverse=True)[:12]
    top_cpu = sorted((e for e in ops if e.key != "cudaDeviceSynchronize"), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    top_op_gpu = sorted(ops, key=dev, reverse=True)[:12]
    return {
        "prof_steps": k,
        "prof_cpu_ms": cpu,
        "prof_gpu_ms": gpu,
        "prof_sync_ms": sync_us / k / 1e3,
        "prof_top_gpu": [[e.key[:120], round(dev(e) / k / 1e3, 3), e.count // k] for e in top_gpu if dev(e) > 0],
        "prof_top_op_gpu": [[e.key[:120], round(dev(e) / k / 1e3, 3), e.count // k] for e in top_op_gpu if dev(e) > 0],
        "prof_top_cpu": [[e.key[:120], round(e.self_cpu_time_total / k / 1e3, 3), e.count // k] for e in top_cpu],
    }


# --------------------------------------------------------------------------- way in 1: qat.prepare + a loop


def build_model(cfg: GPTConfig, row: str, device: torch.device) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = GPT(cfg)
    info: dict[str, Any] = {"params": n_params(model)}
    if row in ROW_PLAN:
        import qat

        qat.prepare(model, plan(ROW_PLAN[row]))
    elif row == "torchao":
        torchao_prepare(model)
    info["retied_head"] = model.tie()
    info["params_trained"] = n_params(model)  # learned quantizer scales included
    return model.to(device), info


def make_batches(cfg: GPTConfig, batch: int, seq: int, n: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        xy = torch.randint(0, cfg.vocab, (batch, seq + 1), generator=g)
        out.append((xy[:, :-1].contiguous().to(device), xy[:, 1:].contiguous().to(device)))
    return out


def make_optimizer(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=device.type == "cuda")


def run_prepare(cfg: GPTConfig, row: str, mode: str, args, device: torch.device) -> dict:
    t_build = time.perf_counter()
    model, info = build_model(cfg, row, device)
    info["prepare_s"] = time.perf_counter() - t_build
    model.train()
    opt = make_optimizer(model.parameters(), device)
    kw = compile_kwargs(mode)
    batches = make_batches(cfg, args.batch, args.seq, 2, device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if row in ROW_PLAN and kw is not None:
        # calibrate first, eagerly, as the callback does: the quantizers hold a range (LSQ scales
        # initialized, flags set) before torch.compile traces, so no graph depends on a first batch
        with torch.no_grad(), autocast:
            model(*batches[0])
    fwd = torch.compile(model, **kw) if kw is not None else model

    def step(i: int) -> None:
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        x, y = batches[i % len(batches)]
        with autocast:
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    step(0)
    sync(device)
    info["first_step_s"] = time.perf_counter() - t0
    graphs_after_first = int(counters.get("stats", {}).get("unique_graphs", 0))
    for i in range(1, args.warmup):
        step(i)
    sync(device)
    info["warmup_s"] = time.perf_counter() - t0

    ms, host = time_loop(step, args.steps, device)
    info.update(host)
    info.update(summarize_steps(ms))
    if device.type == "cuda":
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if mode != "eager":
        st = dynamo_stats()
        st["graphs_after_first_step"] = st["unique_graphs"] - graphs_after_first
        info.update(st)
    if args.profile_steps and mode != "cudagraphs":  # a CUDA graph's kernels are one launch to the profiler
        info.update(profile_steps(step, args.profile_steps, device))
    del fwd, model, opt, batches
    return info


def time_loop(step: Callable[[int], None], steps: int, device: torch.device) -> tuple[list[float], dict]:
    """``steps`` steps, timed at their boundaries: CUDA events on a GPU, the host clock with a
    synchronize per step on the CPU."""
    host = []
    cpu0 = time.process_time()
    if device.type == "cuda":
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        w0 = time.perf_counter()
        for i in range(steps):
            ev[i].record()
            h0 = time.perf_counter()
            step(i)
            host.append((time.perf_counter() - h0) * 1e3)
        ev[steps].record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - w0
        ms = [ev[i].elapsed_time(ev[i + 1]) for i in range(steps)]
    else:
        w0 = time.perf_counter()
        ms = []
        for i in range(steps):
            h0 = time.perf_counter()
            step(i)
            ms.append((time.perf_counter() - h0) * 1e3)
        host = list(ms)
        wall = time.perf_counter() - w0
    cpu = (time.process_time() - cpu0) / steps * 1e3
    return ms, {"host_ms": statistics.median(host), "cpu_ms": cpu, "wall_ms": wall / steps * 1e3}


# --------------------------------------------------------------------------- way in 2: a Lightning Trainer


def run_trainer(cfg: GPTConfig, row: str, mode: str, args, device: torch.device) -> dict:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    info: dict[str, Any] = {}
    total = args.warmup + args.steps
    kw = compile_kwargs(mode)
    is_cuda = device.type == "cuda"

    class LitGPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = GPT(cfg)
            info["params"] = n_params(self.model)
            self._configured = False

        def configure_model(self) -> None:
            if self._configured:
                return
            self._configured = True
            if row == "torchao":
                torchao_prepare(self.model)
            info["retied_head"] = self.model.tie()  # after the QAT callback's setup() prepared it
            info["params_trained"] = n_params(self.model)
            if kw is not None:
                self.model = torch.compile(self.model, **kw)

        def training_step(self, batch, batch_idx):
            if mode == "cudagraphs":
                torch.compiler.cudagraph_mark_step_begin()
            x, y = batch
            return self.model(x, y)

        def configure_optimizers(self):
            return make_optimizer(self.parameters(), device)

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.ev: list = []
            self.host: list[float] = []
            self.ms: list[float] = []

        def on_train_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 1:
                sync(device)
                info["first_step_s"] = time.perf_counter() - self.t0
                from torch._dynamo.utils import counters

                self.graphs_after_first = int(counters.get("stats", {}).get("unique_graphs", 0))
            if batch_idx == args.warmup:
                sync(device)
                info["warmup_s"] = time.perf_counter() - self.t0
                self.cpu0 = time.process_time()
                self.w0 = time.perf_counter()
            if batch_idx >= args.warmup:
                if is_cuda:
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    self.ev.append(e)
                self.h0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx >= args.warmup:
                self.host.append((time.perf_counter() - self.h0) * 1e3)
            if batch_idx == total - 1:
                if is_cuda:
                    e = torch.cuda.Event(enable_timing=True)
                    e.record()
                    self.ev.append(e)
                sync(device)
                self.wall = time.perf_counter() - self.w0
                self.cpu = time.process_time() - self.cpu0

    torch.manual_seed(1)
    xy = torch.randint(0, cfg.vocab, (total * args.batch, args.seq + 1))
    data = torch.utils.data.TensorDataset(xy[:, :-1].contiguous(), xy[:, 1:].contiguous())
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=False, num_workers=0, pin_memory=is_cuda)
    timer = StepTimer()
    callbacks: list = [timer]
    if row in ROW_PLAN:
        from qat.callbacks import QuantizationAwareTraining

        callbacks.append(QuantizationAwareTraining(plan(ROW_PLAN[row]), skip_nonfinite=args.skip_nonfinite))
    trainer = pl.Trainer(
        precision="bf16-mixed",
        accelerator="gpu" if is_cuda else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=total,
        max_epochs=1,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    lit = LitGPT()
    t_fit = time.perf_counter()
    trainer.fit(lit, train_dataloaders=loader)
    info["fit_s"] = time.perf_counter() - t_fit
    if is_cuda:
        ms = [timer.ev[i].elapsed_time(timer.ev[i + 1]) for i in range(len(timer.ev) - 1)]
    else:
        ms = list(timer.host)
    info.update(summarize_steps(ms))
    info["host_ms"] = statistics.median(timer.host)
    info["cpu_ms"] = timer.cpu / args.steps * 1e3
    info["wall_ms"] = timer.wall / args.steps * 1e3
    if is_cuda:
        info["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if mode != "eager":
        st = dynamo_stats()
        st["graphs_after_first_step"] = st["unique_graphs"] - getattr(timer, "graphs_after_first", 0)
        info.update(st)
    del trainer, lit, loader
    return info


# --------------------------------------------------------------------------- environment and output


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cupy": _version("cupy-cuda13x") or _version("cupy-cuda12x") or _version("cupy"),
        "torchao": _version("torchao"),
        "lightning": _version("lightning"),
        "pytorch_lightning": _version("pytorch-lightning"),
        "triton": _version("triton"),
        "cpu_count": os.cpu_count(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        p = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        env["sm_count"] = p.multi_processor_count
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            ).stdout.strip()
            env["driver"], env["sm_clock_max"], env["power_limit"] = [s.strip() for s in out.split(",")][:3]
        except Exception as exc:  # no nvidia-smi
            env["driver"] = f"unknown ({type(exc).__name__})"
    else:
        env["gpu"] = "cpu"
    try:
        root = pathlib.Path(__file__).resolve().parent.parent
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout
        env["git_dirty_files"] = [ln[3:] for ln in dirty.splitlines()]
    except Exception:
        pass
    return env


def gpu_tag(env: dict) -> str:
    name = env.get("gpu", "cpu")
    words = [w for w in re.split(r"[\s\-_]+", name) if w and w.upper() != "NVIDIA"]
    return (words[0] if words else "gpu").lower()


def _key(r: dict) -> tuple:
    return (r["model"], r["batch"], r["seq"], r["via"], r["mode"], r["row"])


def _float_of(results: list[dict], r: dict) -> Optional[dict]:
    for f in results:
        if f["row"] == "float" and f.get("ok") and _key(f)[:-1] == _key(r)[:-1]:
            return f
    return None


def _fmt(v: Optional[float], spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if not a or not b else f"{a / b:.2f}x"


def _short_git(g: Optional[str]) -> str:
    g = g or "?"
    return g[:10] if re.fullmatch(r"[0-9a-f]{40}", g) else g


def _one_line(text: str, n: int = 240) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


def render(doc: dict) -> str:
    res = doc["results"]
    env = doc["env"]
    lines = [f"# QAT training-step cost on {env.get('gpu', '?')}", ""]
    lines += [
        "GPU {gpu} ({mem} GiB, {sm} SMs), driver {drv}, CUDA {cuda}; torch {torch}, CuPy {cupy}, torchao {tao}, "
        "lightning {li} / pytorch_lightning {pl}, triton {tr}; Python {py}; {date}; git {git}{dirty}.".format(
            gpu=env.get("gpu"), mem=env.get("gpu_memory_gib", "-"), sm=env.get("sm_count", "-"), drv=env.get("driver", "-"),
            cuda=env.get("cuda_runtime"), torch=env.get("torch"), cupy=env.get("cupy"), tao=env.get("torchao"),
            li=env.get("lightning"), pl=env.get("pytorch_lightning"), tr=env.get("triton"), py=env.get("python"),
            date=env.get("date"), git=_short_git(env.get("git_commit")),
            dirty=" (uncommitted changes in: " + ", ".join(env["git_dirty_files"]) + ")" if env.get("git_dirty_files") else "",
        ),
        "",
        "Command(s):",
        "",
    ]
    lines += [f"    {c}" for c in doc.get("commands", [])]
    lines += [""]
    if doc.get("prewarm_s") is not None:
        lines += [f"Compile pre-warm before the first row (the process's one-time compile costs, so no row's warm-up "
                  f"holds them): {doc['prewarm_s']} s.", ""]
    if doc.get("notes"):
        lines += [f"- {n}" for n in doc["notes"]] + [""]
    params = {(r["model"], r["batch"], r["seq"]): r["params"] for r in res if r.get("params")}
    vocab = {(r["model"], r["batch"], r["seq"]): r.get("vocab") or doc.get("model_config", {}).get("vocab") for r in res}
    models = sorted({(r["model"], r["batch"], r["seq"]) for r in res}, key=str)
    for m, b, s in models:
        p = params.get((m, b, s))
        v = vocab.get((m, b, s))
        lines.append(f"Model `{m}`: {'-' if p is None else f'{p / 1e6:.1f}M'} parameters (tied head), vocabulary {v or '-'}, "
                     f"batch {b} x {s} tokens.")
    lines += [
        "",
        "Plan for ours: every `nn.Linear` (the tied LM head included), int4 symmetric per-group-128 weights "
        "(STE or LSQ), int8 asymmetric dynamic per-token inputs; torchao: `QATConfig` with "
        "`IntxFakeQuantizeConfig(torch.int4, group_size=128, is_symmetric=True)` weights and "
        "`IntxFakeQuantizeConfig(torch.int8, 'per_token', is_symmetric=False)` activations. bf16 autocast, "
        "fused AdamW (eager in every mode). Step time: median of the timed steps (CUDA events at step boundaries) "
        "after the warm-up steps; ratios against float in the same mode and way in.",
        "",
    ]
    for via in ("prepare", "trainer"):
        sub = [r for r in res if r["via"] == via]
        if not sub:
            continue
        for m, b, s in models:
            msub = [r for r in sub if (r["model"], r["batch"], r["seq"]) == (m, b, s)]
            if not msub:
                continue
            modes = [md for md in ALL_MODES if any(r["mode"] == md for r in msub)]
            rows = [rw for rw in ALL_ROWS if any(r["row"] == rw for r in msub)]
            lines += [f"## Step time, via {via} (`{m}`, {b} x {s})", ""]
            lines.append("| row | " + " | ".join(MODE_LABELS[md] for md in modes) + " |")
            lines.append("|---|" + "---:|" * len(modes))
            for rw in rows:
                cells = []
                for md in modes:
                    r = next((r for r in msub if r["row"] == rw and r["mode"] == md), None)
                    if r is None:
                        cells.append("")
                    elif not r.get("ok"):
                        cells.append("- (" + (r.get("note") or "failed") + ")")
                    else:
                        f = _float_of(res, r)
                        cells.append(f"{r['step_ms']:.1f} ms" + ("" if rw == "float" else f" ({_ratio(r['step_ms'], f and f['step_ms'])})"))
                lines.append(f"| {ROW_LABELS[rw]} | " + " | ".join(cells) + " |")
            lines.append("")
    with_code = any(r.get("code") for r in res)
    lines += [
        "## Detail",
        "",
        "step: median ms (min / p90); mem: `torch.cuda.max_memory_allocated`; warm-up: wall s of the first warm-up steps "
        "(first step alone in brackets); host: median ms from a step's start until the host returns from it; CPU: "
        "`time.process_time` per timed step (all threads); prof CPU / GPU: `torch.profiler` self CPU and self GPU "
        "total per step (eager and compile; not under CUDA graphs); breaks / recompiles / graphs (+ after step 1) / cg skips: dynamo graph breaks, "
        "guard-failure recompiles, compiled graphs (of which compiled after the first step), Inductor CUDA-graph skips.",
        "",
        "| via | model | mode | row | step ms | x float | peak GiB | x float | warm-up s | host ms | CPU ms | prof CPU / GPU ms | breaks | recompiles | graphs (+after 1) | cg skips |"
        + (" code |" if with_code else ""),
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if with_code else ""),
    ]
    order = {(v, md, rw): i for i, (v, md, rw) in enumerate(
        (v, md, rw) for v in ("prepare", "trainer") for md in ALL_MODES for rw in ALL_ROWS)}
    for r in sorted(res, key=lambda r: (r["model"], order.get((r["via"], r["mode"], r["row"]), 0))):
        head = f"| {r['via']} | {r['model']} | {r['mode']} | {r['row']} |"
        if not r.get("ok"):
            lines.append(head + f" - ({r.get('note') or 'failed'}) |" + " |" * (11 + with_code))
            continue
        f = _float_of(res, r)
        prof = "-" if r.get("prof_cpu_ms") is None else f"{r['prof_cpu_ms']:.1f} / {r['prof_gpu_ms']:.1f}"
        graphs = "-" if r.get("unique_graphs") is None else f"{r['unique_graphs']} (+{r.get('graphs_after_first_step', 0)})"
        lines.append(
            head
            + f" {r['step_ms']:.1f} ({r['step_ms_min']:.1f} / {r['step_ms_p90']:.1f}) | {_ratio(r['step_ms'], f and f['step_ms'])} |"
            + f" {_fmt(r.get('peak_mem_gib'), '.2f')} | {_ratio(r.get('peak_mem_gib'), f and f.get('peak_mem_gib'))} |"
            + f" {_fmt(r.get('warmup_s'))} ({_fmt(r.get('first_step_s'))}) | {_fmt(r.get('host_ms'))} | {_fmt(r.get('cpu_ms'))} | {prof} |"
            + f" {_fmt(r.get('graph_breaks'), 'd')} | {_fmt(r.get('recompiles'), 'd')} | {graphs} | {_fmt(r.get('cudagraph_skips'), 'd')} |"
            + (f" {r.get('code', '')} |" if with_code else "")
        )
    notes = []
    for r in res:
        tag = f"{r['via']}/{r['model']}/{r['mode']}/{r['row']}"
        if not r.get("ok"):
            notes.append(f"- {tag}: {_one_line(r.get('error', r.get('note', 'failed')), 400)}")
        if r.get("backend"):
            notes.append(f"- {tag}: kernel backend `{r['backend']}`" + ("; the tied head had to be re-tied" if r.get("retied_head") else ""))
        if r.get("graph_break_reasons"):
            notes.append(f"- {tag} graph breaks: " + "; ".join(f"{n}x {_one_line(k)}" for k, n in r["graph_break_reasons"][:3]))
        if r.get("warmup_parts") and r["mode"] != "eager" or (r.get("warmup_parts") or {}).get("kernel_builds", 0) >= 1:
            notes.append(f"- {tag} warm-up parts (s): " + ", ".join(f"`{k}` {v}" for k, v in r["warmup_parts"].items()))
        if r.get("recompile_reasons"):
            notes.append(f"- {tag} recompiles ({r['recompiles']}), first: " + "; ".join(_one_line(x, 200) for x in r["recompile_reasons"][:2]))
    if notes:
        lines += ["", "## Notes", ""] + notes
    prof_rows = [r for r in res if r.get("prof_top_gpu") or r.get("prof_top_op_gpu") or r.get("prof_top_cpu")]
    if prof_rows:
        lines += ["", "## Profiles (eager and compile, `torch.profiler`, per step: top GPU kernels, top ops by GPU time, top self-CPU ops)", ""]

        def top(items, n=6):
            return "; ".join(f"`{_one_line(k, 60)}` {ms:.2f} ms x{c}" for k, ms, c in (items or [])[:n])

        for r in prof_rows:
            lines.append(f"- {r['via']}/{r['model']}/{r['mode']}/{r['row']}: {r['prof_cpu_ms']:.1f} ms CPU, {r['prof_gpu_ms']:.1f} ms GPU")
            if r.get("prof_top_gpu"):
                lines.append("  - kernels: " + top(r["prof_top_gpu"]))
            if r.get("prof_top_op_gpu"):
                lines.append("  - ops by GPU time: " + top(r["prof_top_op_gpu"]))
            lines.append("  - ops by self CPU: " + top(r.get("prof_top_cpu")))
    return "\n".join(lines) + "\n"


def write(doc: dict, out: pathlib.Path, tag: str) -> tuple[pathlib.Path, pathlib.Path]:
    out.mkdir(parents=True, exist_ok=True)
    j, m = out / f"train_step_{tag}.json", out / f"train_step_{tag}.md"
    j.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    m.write_text(render(doc))
    return j, m


def merge(paths: list[str], out: pathlib.Path, tag: str, extra_notes: Optional[list[str]] = None) -> dict:
    docs = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    by_key: dict = {}
    commands: list[str] = []
    for d in docs:
        for r in d["results"]:
            by_key[_key(r)] = r
        commands += [c for c in d.get("commands", []) if c not in commands]
    notes = [n for d in docs for n in d.get("notes", [])] + list(extra_notes or [])
    doc = {"env": docs[-1]["env"], "envs": [d["env"] for d in docs], "commands": commands, "notes": notes,
           "results": list(by_key.values())}
    prewarm = [str(d["prewarm_s"]) for d in docs if d.get("prewarm_s") is not None]
    if prewarm:
        doc["prewarm_s"] = " / ".join(prewarm) + " (one a run)"
    write(doc, out, tag)
    return doc


# --------------------------------------------------------------------------- main


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--via", default="prepare", help="prepare, trainer, or both: prepare,trainer")
    p.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma list of {ALL_MODES}")
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma list of {ALL_ROWS}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation included)")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the model's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the model's)")
    p.add_argument("--vocab", type=int, default=None,
                   help="vocabulary size (default: the model's, GPT-2's 50257; 50304 = nanoGPT's padding to a multiple of 64)")
    p.add_argument("--skip-nonfinite", type=int, default=1,
                   help="the callback's skip_nonfinite (via trainer): check the quantizer state every N steps, 0 never")
    p.add_argument("--device", default="cuda")
    p.add_argument("--profile-steps", type=int, default=None, help="eager steps under torch.profiler (default 3 on CUDA, 0 on CPU)")
    p.add_argument("--out", default=str(RESULTS), help="folder for train_step_<tag>.md / .json")
    p.add_argument("--tag", default=None, help="file tag (default: the GPU's short name, e.g. h200, or cpu)")
    p.add_argument("--merge", nargs="+", default=None, help="only merge these result JSONs into one table")
    p.add_argument("--note", action="append", default=[], help="a line for the results' notes (repeatable)")
    args = p.parse_args(argv)
    if args.warmup < 2:
        p.error("--warmup must be at least 2 (the first step is timed apart from the rest of the warm-up)")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse(argv)
    if args.merge:
        doc = merge(args.merge, pathlib.Path(args.out), args.tag or "merged", args.note)
        print(render(doc))
        return doc
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run with --device cpu --model tiny for a smoke run")
    cfg = MODELS[args.model]
    if args.vocab:
        cfg = dataclasses.replace(cfg, vocab=args.vocab)
    args.batch = args.batch or cfg.batch
    args.seq = args.seq or cfg.seq
    if args.seq > cfg.ctx:
        raise SystemExit(f"--seq {args.seq} exceeds the model's context {cfg.ctx}")
    if args.profile_steps is None:
        args.profile_steps = 3 if device.type == "cuda" else 0
    vias = [v.strip() for v in args.via.split(",") if v.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for name, got, valid in (("via", vias, ("prepare", "trainer")), ("modes", modes, ALL_MODES), ("rows", rows, ALL_ROWS)):
        bad = [g for g in got if g not in valid]
        if bad:
            raise SystemExit(f"--{name}: unknown {bad}; valid: {list(valid)}")
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*Trying to infer the `batch_size`.*")
    import logging

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning").setLevel(logging.WARNING)

    env = environment(device)
    tag = args.tag or gpu_tag(env)
    command = "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv)
    doc: dict[str, Any] = {"env": env, "commands": [command], "notes": list(args.note), "args": vars(args),
                           "model_config": asdict(cfg), "results": []}
    tao_missing = torchao_available() if "torchao" in rows else None
    out = pathlib.Path(args.out)
    print(f"# {env.get('gpu')} | torch {env['torch']} | CuPy {env['cupy']} | torchao {env['torchao']} | {command}", flush=True)
    time_kernel_compiles()
    if any(m != "eager" for m in modes):
        doc["prewarm_s"] = prewarm_compiler(device, "trainer" in vias)
    for via in vias:
        for mode in modes:
            for row in rows:
                rec: dict[str, Any] = {"model": args.model, "vocab": cfg.vocab, "batch": args.batch, "seq": args.seq, "via": via,
                                       "mode": mode, "row": row}
                if row == "torchao" and tao_missing:
                    rec.update(ok=False, note="torchao not importable", error=tao_missing)
                    doc["results"].append(rec)
                    continue
                reset_state(device)
                t0 = time.perf_counter()
                try:
                    if row in ROW_PLAN:
                        rec["backend"] = set_kernel_backend("reference" if row == "ste_ref" else "cupy", device)
                        set_fused_linear(not row.endswith("_unfused"))
                        rec["compile_route"] = set_route(ROW_ROUTE.get(row, DEFAULT_ROUTE))
                    fn = run_prepare if via == "prepare" else run_trainer
                    rec.update(fn(cfg, row, mode, args, device))
                    rec["ok"] = True
                except Exception as exc:  # one configuration failing must not lose the others
                    rec.update(ok=False, note=type(exc).__name__, error=f"{type(exc).__name__}: {str(exc)[:800]}",
                               traceback=traceback.format_exc()[-3000:])
                finally:
                    if row == "ste_ref":
                        set_kernel_backend("cupy", device)
                    if row in ROW_ROUTE:
                        set_route(DEFAULT_ROUTE)
                    if row.endswith("_unfused"):
                        set_fused_linear(True)
                rec["config_wall_s"] = time.perf_counter() - t0
                rec["warmup_parts"] = warmup_parts()
                doc["results"].append(rec)
                if rec["ok"]:
                    print(f"{via:8s} {mode:10s} {row:8s} step {rec['step_ms']:8.2f} ms  mem {_fmt(rec.get('peak_mem_gib'), '.2f')} GiB  "
                          f"warm-up {rec['warmup_s']:6.1f} s  host {rec['host_ms']:7.2f} ms  cpu {rec['cpu_ms']:7.2f} ms"
                          + (f"  prof cpu/gpu {rec['prof_cpu_ms']:.1f}/{rec['prof_gpu_ms']:.1f} ms" if "prof_cpu_ms" in rec else "")
                          + (f"  breaks {rec['graph_breaks']} recompiles {rec['recompiles']} graphs {rec['unique_graphs']}"
                             f"(+{rec['graphs_after_first_step']}) cg-skips {rec['cudagraph_skips']}" if "graph_breaks" in rec else ""),
                          flush=True)
                    print("  warm-up parts (s): " + ", ".join(f"{k} {v}" for k, v in rec["warmup_parts"].items()), flush=True)
                else:
                    print(f"{via:8s} {mode:10s} {row:8s} FAILED {rec['error'][:300]}", flush=True)
                reset_state(device)
                write(doc, out, tag)
    j, m = write(doc, out, tag)
    print()
    print(render(doc))
    print(f"wrote {j} and {m}")
    return doc


if __name__ == "__main__":
    main()
