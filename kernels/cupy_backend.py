"""Fused CuPy fake-quant kernels: the CUDA backend of :mod:`qat.kernels.ops`.

Same functions, signatures and return conventions as :mod:`qat.kernels.reference` (contiguous
outputs, the packed int32 STE mask, float32 parameter gradients), computed by the CUDA sources in
``csrc/``:

* ``fake_quant.cu``: the forward quantize-dequantize (STE, LSQ and PACT variants), which also writes
  the 1-bit clip mask with warp shuffles, and the clipped-STE backward that reads it;
* ``rows.cu``: the "range of the data" forward (dynamic per-token / per-group activations, and a
  weight's min/max observer update with its scale and zero point), one warp a contiguous row: the
  row's finite min / max, the scale and zero point, the quantize-dequantize and the mask in one pass;
* ``reduce.cu``: LSQ/LSQ+ and PACT backward passes that write ``dx`` and reduce ``dscale``/``dzero_point``
  (``dalpha``) in the same pass, and the observer's per-tensor/channel/group min/max;
* ``microscaling.cu``: the float formats (MXFP4, MXFP8, NVFP4, FP8; :mod:`qat.microscaling`): the
  forward with each block's amax and scale computed in the same pass (warp shuffles) and the packed
  mask that ``fq_backward`` applies, and the learned-scale backward (``dx`` and ``dscale``).

Tuning: every launch-shape, dispatch and compile-time setting is a field of one frozen
:class:`~qat.kernels.tuning.KernelTuning`; :data:`~qat.kernels.tuning.DEFAULT_TUNING` holds the measured
defaults. Each public function takes ``tuning=`` (None: the active tuning, :data:`DEFAULT_TUNING` unless
a :func:`use_tuning` block installed another), and the launchers below take it explicitly; nothing else
in this module is a knob. Its device fields become NVRTC ``-D`` options (the CUDA sources have no
defaults of their own), so each kernel is compiled by NVRTC once per (dtype, vector width, device
tuning) and cached (in memory here, on disk by CuPy). A kernel is compiled alone at its first launch
(its entry is an uninstantiated template named by :func:`_entry`), so a model's first step pays for
the few kernels its plan runs, not for every kernel in their files.

Kernels run on PyTorch's current stream, take raw device pointers, and index with 64-bit integers.
Inputs this backend does not cover (float64, mixed dtypes, CPU parameters) go to the reference, so
every call returns the reference's answer.

:func:`compile_all` compiles every instantiation through NVRTC without touching a GPU (the CPU test).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import math
import re
import threading
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

import torch

from qat.granularity import Layout

from . import reference
from .tuning import DEFAULT_TUNING, ByDtype, KernelTuning

try:  # CuPy is optional: without it ops.py keeps every tensor on the reference.
    import cupy
    import numpy as np
    from cupy.cuda import driver as _driver

    _launch_kernel = _driver.launchKernel
except ImportError:  # pragma: no cover - exercised where CuPy is absent
    cupy = None
    np = None

__all__ = [
    "DEFAULT_TUNING",
    "KernelTuning",
    "available",
    "compile_all",
    "current_tuning",
    "use_tuning",
    "aminmax",
    "aminmax_torch",
    "fake_quantize_forward",
    "fake_quantize_backward",
    "fake_quantize_backward_",
    "fake_quantize_lsq_forward",
    "fake_quantize_lsq_backward",
    "fake_quantize_pact_forward",
    "fake_quantize_pact_backward",
    "fake_quantize_minmax_forward",
    "microscaling_forward",
    "microscaling_lsq_backward",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
#: loads per lane of reduce.cu's grp kernels (short aligned runs of keys), one entry point each
_GRP_K = (1, 2, 4, 8)
#: loads per lane of reduce.cu's tile kernels (grp's layout launched one tile a block), one entry point each
_TILE_T = (2, 4, 8)
#: warp steps per warp of fake_quant.cu's tile forward (key mode 1, 32-bit offsets), one entry point each
_FWD_TILE_T = (1, 2, 4)
#: source file -> its extern "C" kernels
_KERNELS = {
    "fake_quant.cu": (
        *(f"fq_forward_{v}_{k}" for v in (0, 1) for k in (0, 1, 2, 3)),
        "fq_forward_2_0",
        *(f"fq_forward_t{t}_{v}_1" for v in (0, 1) for t in _FWD_TILE_T),
        "fq_backward",
        "fq_backward_inplace",
    ),
    "reduce.cu": (
        *(f"lsq_backward_seg{m}" for m in (0, 2)),
        *(f"lsq_backward_grp{k}" for k in _GRP_K),
        *(f"lsq_backward_tile{t}" for t in _TILE_T),
        "lsq_backward_cols",
        "lsq_backward_colsh",
        "lsq_backward_rows",
        "pact_backward_seg",
        *(f"minmax_seg{m}" for m in (0, 2)),
        *(f"minmax_grp{k}" for k in _GRP_K),
        *(f"minmax_tile{t}" for t in _TILE_T),
        "minmax_cols",
        "minmax_colsh",
        "minmax_rows",
    ),
    "rows.cu": tuple(f"fq_rows_{nv}" for nv in (1, 2, 4, 8, 16)),
    "microscaling.cu": ("mx_forward", "mx_lsq_backward"),
}
#: register-held vectors a lane of rows.cu's fq_rows kernels (a row of up to 32 * NV vectors a warp)
_ROWS_NV = (1, 2, 4, 8, 16)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ESIZE = {0: 4, 1: 2, 2: 2}
#: sources whose y (forwards) / grad (STE backward) may be in another dtype than x (``out_dtype``):
#: each x dtype code -> the codes of that other tensor (an element at most x's size)
_OUT_CODES = {0: (0, 1, 2), 1: (1, 2), 2: (2, 1)}
_TWO_DTYPES = ("fake_quant.cu", "rows.cu")
_ROUND = {mode: i for i, mode in enumerate(reference.ROUND_MODES)}
#: threads of a block (the sources' QAT_THREADS, passed as a define); the tile kernels take fewer
#: (KernelTuning.tile_threads, fwd_tile_threads)
_THREADS = 256


# ----------------------------------------------------------------------------- tuning

_active_tuning: KernelTuning = DEFAULT_TUNING
_tuning_lock = threading.Lock()


def current_tuning() -> KernelTuning:
    """The tuning that calls without ``tuning=`` use (:data:`DEFAULT_TUNING` outside :func:`use_tuning`)."""
    return _active_tuning


@contextlib.contextmanager
def use_tuning(tuning: Optional[KernelTuning] = None, **changes) -> Iterator[KernelTuning]:
    """Install ``tuning`` (default: the current one), with ``changes`` applied by ``dataclasses.replace``,
    as the process-wide tuning of this backend for the block; the previous one is restored on exit.

    For sweeps and tests that go through the public ops (which take no tuning argument): every thread
    sees it, autograd's backward threads too. Blocks nest; do not interleave them across threads.

    Example::

        with cupy_backend.use_tuning(cols_rows_lsq=2):  # a compile-time field: recompiles reduce.cu
            fake_quantize_lsq(x, s, z, -8, 7, axis=1).sum().backward()
    """
    global _active_tuning
    new = _active_tuning if tuning is None else tuning
    if not isinstance(new, KernelTuning):
        raise TypeError(f"use_tuning takes a KernelTuning, not {type(new).__name__}")
    if changes:
        new = dataclasses.replace(new, **changes)
    with _tuning_lock:
        prev, _active_tuning = _active_tuning, new
    try:
        yield new
    finally:
        with _tuning_lock:
            _active_tuning = prev


def _tn(tuning: Optional[KernelTuning]) -> KernelTuning:
    return _active_tuning if tuning is None else tuning


# ----------------------------------------------------------------------------- compilation


def _source(name: str) -> str:
    """A kernel source with ``common.cuh`` pasted in, so CuPy's cache key covers the header too."""
    text = (_CSRC / name).read_text()
    header = (_CSRC / "common.cuh").read_text()
    return text.replace('#include "common.cuh"', header)


def _options(dtype_code: int, vec: int, defines: tuple[str, ...], out_code: Optional[int] = None) -> tuple[str, ...]:
    """NVRTC options of one module: the instantiation (x's dtype, the other streamed tensor's dtype
    ``out_code``, default x's, vector width, block size) and the tuning's device fields
    (``KernelTuning.defines(dtype_code)``); the sources define nothing of these themselves."""
    out_code = dtype_code if out_code is None else out_code
    # --fmad=false: no a*b+c contraction, so every float op rounds like PyTorch's (bit-exact parity).
    return ("-std=c++17", "--fmad=false", f"-DQAT_DTYPE={dtype_code}", f"-DQAT_OTYPE={out_code}", f"-DQAT_VEC={vec}",
            f"-DQAT_THREADS={_THREADS}", *defines)  # fmt: skip


def _variants():
    """Every (source, dtype code, vector width, out dtype code) this backend can launch."""
    for name in _KERNELS:
        for code, esize in _ESIZE.items():
            for vec in (1, 16 // esize):
                for out in _OUT_CODES[code] if name in _TWO_DTYPES else (code,):
                    yield name, code, vec, out


def _entry(kernel: str) -> str:
    """The NVRTC name expression of a kernel: its entry point is a template (``QAT_ENTRY`` in
    ``common.cuh``) that only this instantiation compiles."""
    return f"{kernel}<0>"


def _compile(
    name: str, code: int, vec: int, arch: str, tuning: KernelTuning, out: Optional[int] = None,
    kernels: Optional[tuple[str, ...]] = None,
) -> tuple[str, int]:  # fmt: skip
    """NVRTC-compile the ``kernels`` of one instantiation (default: all of the source's) without a GPU:
    ``(ptx, size)``, size that of the cubin for a real ``arch`` (of the PTX for a virtual one)."""
    from cupy.cuda import nvrtc

    kernels = _KERNELS[name] if kernels is None else kernels
    prog = nvrtc.createProgram(_source(name), name, [], [])
    try:
        for k in kernels:
            nvrtc.addNameExpression(prog, _entry(k))
        try:
            nvrtc.compileProgram(prog, [*_options(code, vec, tuning.defines(code), out), f"--gpu-architecture={arch}"])
        except nvrtc.NVRTCError as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed on {name} (dtype {code}, out {out}, vec {vec}): {exc}\n{log}") from exc
        ptx = nvrtc.getPTX(prog)
        ptx = ptx.decode() if isinstance(ptx, bytes) else ptx
        entries = set(re.findall(r"\.entry\s+(\w+)\(", ptx))
        missing = [k for k in kernels if nvrtc.getLoweredName(prog, _entry(k)) not in entries]
        if missing or len(entries) != len(kernels):
            raise RuntimeError(
                f"{name} (dtype {code}, out {out}, vec {vec}) compiled without kernels {missing}"
                f" or with entries not asked for ({len(entries)} entries, {len(kernels)} asked)"
            )
        return ptx, len(ptx) if arch.startswith("compute_") else len(nvrtc.getCUBIN(prog))
    finally:
        nvrtc.destroyProgram(prog)


def compile_all(arch: str = "sm_90", tuning: KernelTuning = DEFAULT_TUNING) -> dict[tuple[str, int, int], int]:
    """Compile every kernel instantiation with NVRTC for ``arch`` and ``tuning``, without a GPU.

    Args:
        arch: a real architecture (``"sm_90"``): NVRTC compiles down to machine code, so assembler
            errors (inline PTX) surface too; or a virtual one (``"compute_90"``): PTX only, about
            three times faster.
        tuning: whose device fields become the sources' defines (:data:`DEFAULT_TUNING`).

    Returns:
        ``{(source, dtype_code, vec, out_code): size in bytes of the cubin (or the PTX)}``.

    Raises:
        ImportError: CuPy or its NVRTC library is missing.
        RuntimeError: a source failed to compile or lacks one of its kernels; the message holds the
            NVRTC log.
    """
    if cupy is None:
        raise ImportError("compile_all needs CuPy")
    return {v: _compile(*v[:3], arch, tuning, v[3])[1] for v in _variants()}


_lock = threading.Lock()


def _cache_key(name: str, dtype_code: int, vec: int, tuning: KernelTuning) -> tuple:
    """What a compiled module is cached under: the instantiation and the tuning's device fields (host
    fields need no recompile)."""
    return name, dtype_code, vec, tuning.defines(dtype_code)


@functools.lru_cache(maxsize=None)
def _kernel(name: str, kernel: str, dtype_code: int, vec: int, defines: tuple[str, ...], device: int, out_code: int):
    """``kernel`` of source ``name``, compiled alone for this instantiation (one module a kernel)."""
    with _lock, cupy.cuda.Device(device):
        module = cupy.RawModule(
            code=_source(name), options=_options(dtype_code, vec, defines, out_code), name_expressions=(_entry(kernel),)
        )
        return module.get_function(_entry(kernel))


def _get(name: str, kernel: str, dtype_code: int, vec: int, device: int, tn: KernelTuning, out_code: Optional[int] = None):
    """The compiled ``kernel`` of source ``name`` for this instantiation and tuning (``out_code``: the
    dtype of y / the STE backward's grad where it differs from x's)."""
    out_code = dtype_code if out_code is None else out_code
    return _kernel(name, kernel, dtype_code, vec, tn.defines(dtype_code), device, out_code)


@functools.lru_cache(maxsize=None)
def _num_sms(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_occupancy: dict[tuple[int, int], int] = {}


def _blocks_per_sm(kern, shared_mem: int) -> int:
    key = (id(kern), shared_mem)  # kernels are cached for the process's life, so ids are stable
    if key not in _occupancy:
        try:
            from cupy.cuda import driver

            blocks = driver.occupancyMaxActiveBlocksPerMultiprocessor(kern.kernel.ptr, _THREADS, shared_mem)
            _occupancy[key] = max(1, int(blocks))
        except Exception:  # noqa: BLE001 - occupancy is a tuning hint only
            _occupancy[key] = 4
    return _occupancy[key]


def _wave(kern, device: int, waves: float, shared_mem: int = 0) -> int:
    """Blocks of ``waves`` full waves (every block resident at once); loops stride over the rest."""
    return max(1, int(_num_sms(device) * _blocks_per_sm(kern, shared_mem) * waves))


def _elementwise_grid(kern, work: int, per_block: int, device: int, tn: KernelTuning) -> int:
    """The grid of an elementwise kernel (a grid-stride loop) over ``work`` items, ``per_block`` a block
    a step: one block per ``per_block`` items, at most ``tn.elementwise_waves`` waves."""
    return max(1, min(-(-work // per_block), _wave(kern, device, tn.elementwise_waves), 2**31 - 1))


_streams: dict[tuple[int, int], object] = {}
_direct_launch = True  # Function(grid, block, args, shared_mem, stream): no context managers


def _current_stream_handle(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# the current stream's raw handle and the current device without torch.cuda's Python layers (a
# torch.cuda.Stream object, lazy-init checks): what Inductor's generated code calls; absent from CPU builds
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", _current_stream_handle)
_current_device = getattr(torch._C, "_cuda_getDevice", torch.cuda.current_device)


def _stream(device: int):
    """PyTorch's current stream on ``device`` as a CuPy stream (cached by handle)."""
    ptr = _raw_stream(device)
    s = _streams.get((device, ptr))
    if s is None:
        with warnings.catch_warnings():  # ExternalStream is deprecated in CuPy 14, still the plain way
            warnings.simplefilter("ignore")
            s = cupy.cuda.ExternalStream(ptr, device)
        _streams[(device, ptr)] = s
    return s


def _launch(kern, grid, args, device: int, shared_mem: int = 0, threads: int = _THREADS) -> None:
    global _direct_launch
    if isinstance(grid, int):
        grid = (grid,)
    stream = _stream(device)
    if _direct_launch and device == _current_device():
        try:  # the cheapest path: CuPy's Function takes the stream as an argument
            kern.kernel(grid, (threads,), args, shared_mem, stream)
            return
        except TypeError:  # another CuPy signature: use the context managers from now on
            _direct_launch = False
    with cupy.cuda.Device(device), stream:
        kern(grid, (threads,), args, shared_mem=shared_mem)


# ----------------------------------------------------------------------------- launch plans
# What a launch takes besides its tensors' pointers (kernel, grid, block, the scalar arguments) depends
# only on the call's shapes, dtypes, device, scalars, pointer alignment and tuning. The hot paths (the
# quantize-dequantize forward, the STE backward, the range-of-the-data forward) compute it once per such
# key and replay it: a training step's repeated calls on the same shapes pay for their outputs'
# allocations and one launch (benchmarks/quantizer_host_cost.py measures the host cost per call).


class _Plan(NamedTuple):
    kern: object
    grid: tuple
    threads: int
    shared: int
    consts: tuple  # the arguments after the pointers
    tn: KernelTuning  # the tuning it was made under (keys hold its id; kept alive here so ids stay unique)
    block: list  # [its _ParamBlock], made at its first launch ([] until then, [None] where none applies)


class _ParamBlock:
    """A plan's kernel parameters laid out once for ``cuLaunchKernel``: one 8-byte slot an argument
    (the driver reads each at the size the kernel declares, little-endian), the scalars written when
    the block is made, the pointers at each launch. A launch is then one slice assignment and one call
    into the driver, without CuPy's conversion of every argument (``tn.param_block``)."""

    __slots__ = ("fn", "dims", "slots", "addr", "nptrs", "tail_at", "lock", "params")

    def __init__(self, plan: _Plan, nptrs: int, ntail: int) -> None:
        consts = plan.consts
        n = nptrs + len(consts) + ntail
        self.slots = (ctypes.c_uint64 * n)()
        base = ctypes.addressof(self.slots)
        self.params = (ctypes.c_void_p * n)(*(base + 8 * i for i in range(n)))
        self.addr = ctypes.addressof(self.params)
        for i, v in enumerate(consts):
            raw = v.tobytes()
            ctypes.memmove(base + 8 * (nptrs + i), raw, len(raw))
        self.fn = plan.kern.kernel.ptr
        grid = (*plan.grid, 1, 1)[:3]
        self.dims = (*grid, plan.threads, 1, 1, plan.shared)
        self.nptrs, self.tail_at = nptrs, nptrs + len(consts)
        self.lock = threading.Lock()  # the slots are shared: one launch at a time writes them

    @staticmethod
    def make(plan: _Plan, nptrs: int, ntail: int) -> Optional["_ParamBlock"]:
        """The block of ``plan``, or None where its scalars are not all numpy scalars of at most 8 bytes."""
        if not all(isinstance(v, np.generic) and v.nbytes <= 8 for v in plan.consts):
            return None
        return _ParamBlock(plan, nptrs, ntail)

    def launch(self, ptrs: tuple, tail: tuple, stream: int) -> None:
        with self.lock:
            slots = self.slots
            slots[: self.nptrs] = ptrs
            if tail:
                slots[self.tail_at :] = tail
            _launch_kernel(self.fn, *self.dims, stream, self.addr, 0)


_plans: dict[tuple, _Plan] = {}
_MAX_PLANS = 4096  # shapes that vary call to call (ragged batches): start over rather than grow


def _plan(key: tuple, tn: KernelTuning, make: Callable[[], _Plan]) -> _Plan:
    plan = _plans.get(key)
    if plan is None or plan.tn is not tn:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = make()
    return plan


def _run(plan: _Plan, ptrs: tuple, device: int, tail: tuple = ()) -> None:
    """Launch ``plan`` with these pointers (ints) first, then its scalars, then ``tail`` (pointers a
    kernel takes last): through its parameter block where ``tn.param_block`` and ``device`` is the
    current one, else through CuPy."""
    if plan.tn.param_block and device == _current_device():
        if not plan.block:
            plan.block.append(_ParamBlock.make(plan, len(ptrs), len(tail)))
        block = plan.block[0]
        if block is not None:
            block.launch(ptrs, tail, _raw_stream(device))
            return
    args = (*(np.uint64(p) for p in ptrs), *plan.consts, *(np.uint64(p) for p in tail))
    _launch(plan.kern, plan.grid, args, device, plan.shared, plan.threads)


# ----------------------------------------------------------------------------- availability


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """True when CuPy is importable and sees a GPU (NVRTC is then used to build the kernels)."""
    if cupy is None or not torch.cuda.is_available():
        return False
    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 - no driver, no device, wrong CUDA
        return False


# ----------------------------------------------------------------------------- helpers


def _ptr(t: Optional[torch.Tensor]):
    return np.uint64(0 if t is None else t.data_ptr())


def _addr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _aligned(*ts: torch.Tensor) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _supported(x: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether the kernels cover these inputs (else the reference answers)."""
    if not (available() and x.is_cuda and x.dtype in _DTYPE_CODE):
        return False
    for t in others:
        if t is not None and t.device != x.device:
            return False
    return True


_CODE_DTYPE = {code: dtype for dtype, code in _DTYPE_CODE.items()}


def _out_code(dtype: torch.dtype, out_dtype: Optional[torch.dtype]) -> Optional[int]:
    """The code of the tensor that goes with one of ``dtype`` (y of a forward of x, grad of the backward
    of dx) in ``out_dtype`` (``dtype`` when None), or None where no kernel pairs them (an element wider
    than x's, or not a float the kernels take): then the result is cast after."""
    code = _DTYPE_CODE[dtype]
    if out_dtype is None or out_dtype == dtype:
        return code
    out = _DTYPE_CODE.get(out_dtype)
    return out if out in _OUT_CODES[code] else None


def _params(p: torch.Tensor) -> torch.Tensor:
    if p.dtype == torch.float32 and p.is_contiguous():
        return p  # only its pointer is used
    return p.detach().reshape(-1).to(torch.float32).contiguous()


@functools.lru_cache(maxsize=1024)
def _fastdiv(d: int) -> tuple:
    """Kernel arguments ``(d, mul, shr)`` of common.cuh's FastDiv: ``n // d == umulhi(n, mul) >> shr``
    for ``0 <= n < 2**31`` (the magic-number division of CUTLASS's FastDivmod)."""
    if d == 1 or d >= 2**31:
        return np.int64(d), np.uint32(0), np.int32(0)
    p = 31 + (d - 1).bit_length()  # 31 + ceil(log2(d))
    return np.int64(d), np.uint32(((1 << p) + d - 1) // d), np.int32(p - 32)


def _use_cols(inner: int, c: int, tn: KernelTuning) -> bool:
    """A ``(C, inner)`` layout for the cols kernels: channels on the last axis, or rows at most
    ``tn.cols_max_width`` wide."""
    return c > 1 and (inner == 1 or c * inner <= tn.cols_max_width)


def _use_rows(inner: int, c: int, vec: int, tn: KernelTuning) -> bool:
    """Long contiguous runs (channels on axis 0, large per-channel inner sizes) of ``vec``-element
    vectors: the rows kernels."""
    return c > 1 and inner // vec >= tn.rows_min_vecs


def _tensor_rows(kind: str, n: int, c: int, vec: int, device: int, tn: KernelTuning) -> Optional[tuple[int, int]]:
    """``(nrows, rowv)`` of a per-tensor reduction on the rows kernels, or None (the seg kernel)."""
    if c != 1 or kind == "pact_backward" or vec == 1:
        return None
    nv = n // vec
    rowv = max(tn.rows_min_vecs, -(-nv // tn.tensor_rows))
    nrows = nv // rowv
    if nrows < 1 or nrows < tn.tensor_rows_min_waves * _num_sms(device):
        return None
    return nrows, rowv


def _by_kind(kind: str, lsq: ByDtype, minmax: ByDtype, code: int):
    return (lsq if kind == "lsq_backward" else minmax)[code]


class _Steps(NamedTuple):
    """The launches of one reduction (:func:`_reduce_steps`), cached per call key as a plan is."""

    launches: tuple  # ((_Plan, byte offset added to the streamed tensors' pointers), ...)
    init: Optional[bool]  # before them: init(False), init(True) (poison), or none (None)
    streamed: int  # the pointers that walk the data (x, grad, dx), first in every launch
    tn: KernelTuning


def _init_mode(stores_all: bool, tn: KernelTuning) -> Optional[bool]:
    if not stores_all:
        return False
    return True if tn.poison_outputs else None


def _launch_reduce(kind: str, x, g, dx, n, inner, c, tail_args: tuple, ptrs: tuple, device: int, tn: KernelTuning,
                   init: Optional[Callable[[bool], None]] = None) -> None:
    """Launch ``{kind}_rows``, ``_cols``, ``_colsh``, ``_grp``, ``_tile`` or ``_seg`` (reduce.cu) for the
    layout ``(inner, C)``: ``ptrs`` (ints) are those of x (, grad, dx) first, then the parameters'.
    The launches depend on the call's shapes, dtype, alignment, scalars and tuning only: computed once
    per such key (:func:`_reduce_steps`) and replayed, each through its parameter block.

    ``init(poison)`` sets the parameter-sized outputs to the reduction's identity (zeros, +-inf), or to
    NaN with ``poison`` (``tn.poison_outputs``, for tests: a key a storing kernel leaves unwritten shows).
    It runs only before kernels that add into them (atomics); the kernels that store every key's total
    (tile, grp on per-group layouts, rows with one block per key) leave the outputs unset before they run,
    which saves two fills of the parameters' size (about 5 us at 64M elements in groups of 128)."""
    tensors = [t for t in (x, g, dx) if t is not None]
    aligned = _aligned(*tensors)
    key = ("reduce", kind, x.dtype, aligned, len(tensors), n, inner, c, tail_args, device, id(tn))
    steps = _plan(key, tn, lambda: _reduce_steps(kind, _DTYPE_CODE[x.dtype], aligned, len(tensors), n, inner, c,
                                                 tail_args, device, tn))  # fmt: skip
    if steps.init is not None and init is not None:
        init(steps.init)
    for plan, off in steps.launches:
        if off:
            _run(plan, tuple(p + off if i < steps.streamed else p for i, p in enumerate(ptrs)), device)
        else:
            _run(plan, ptrs, device)


def _reduce_steps(kind: str, code: int, aligned: bool, streamed: int, n: int, inner: int, c: int, tail_args: tuple,
                  device: int, tn: KernelTuning, tensor_rows: bool = True) -> _Steps:
    """The launches :func:`_launch_reduce` makes; ``tensor_rows=False`` keeps a per-tensor reduction off
    the rows kernels (its tail)."""
    vec_full = 16 // _ESIZE[code]

    def step(kern, grid, consts, shared=0, threads=_THREADS):
        grid = (grid,) if isinstance(grid, int) else grid
        return _Plan(kern, grid, threads, shared, consts, tn, []), 0

    def steps(launches, stores_all: bool) -> _Steps:
        return _Steps(tuple(launches), _init_mode(stores_all, tn), streamed, tn)

    vec_rows = vec_full if aligned and inner % vec_full == 0 else 1
    rows_t = _tensor_rows(kind, n, c, vec_full if aligned else 1, device, tn) if tensor_rows else None
    if rows_t is not None:
        # one parameter for the whole tensor: the rows kernels over virtual rows of rowv vectors (one
        # atomic per row), the tail past the last whole row on the seg kernel
        nrows, rowv = rows_t
        kern = _get("reduce.cu", f"{kind}_rows", code, vec_full, device, tn)
        shape = (np.int64(nrows), np.int64(rowv), np.int64(1), np.int32(0))
        launches = [step(kern, nrows, (*shape, *tail_args))]
        head = nrows * rowv * vec_full
        if head < n:
            off = head * _ESIZE[code]
            rest = _reduce_steps(kind, code, aligned, streamed, n - head, n - head, 1, tail_args, device, tn, False)
            launches += [(plan, off + o) for plan, o in rest.launches]
        return steps(launches, False)
    if kind != "pact_backward" and _use_rows(inner, c, vec_rows, tn):
        # one block per row (grid-stride over rows past 2**31 - 1 blocks)
        vec = vec_rows
        kern = _get("reduce.cu", f"{kind}_rows", code, vec, device, tn)
        nrows = n // inner
        store = np.int32(nrows == c)  # one block per key: plain stores
        shape = (np.int64(nrows), np.int64(inner // vec), np.int64(c), store)
        return steps([step(kern, min(nrows, 2**31 - 1), (*shape, *tail_args))], bool(store))
    if _use_cols(inner, c, tn):
        wd = c * inner
        rows = n // wd
        vec = vec_full if aligned and wd % vec_full == 0 else 1
        half = vec > 1 and bool(_by_kind(kind, tn.cols_half_lsq, tn.cols_half_minmax, code))
        kern = _get("reduce.cu", f"{kind}_colsh" if half else f"{kind}_cols", code, vec, device, tn)
        cv = vec // 2 if half else vec  # columns a thread
        wdv = wd // cv
        colsv = min(wdv, tn.cols_half_vecs if half else tn.cols_vecs)
        r = _THREADS // colsv
        shared = 2 * _THREADS * cv * 4
        gx = -(-wdv // colsv)
        # the grid fits one wave: each block owns its rows start to end, so no block waits for a second one
        gy = max(1, min(-(-rows // r), _wave(kern, device, 1, shared) // gx))
        consts = (np.int64(rows), np.int64(wd), np.int64(inner), np.int32(colsv), np.int32(r), *tail_args)
        return steps([step(kern, (gx, gy), consts, shared)], False)
    vec = vec_full if aligned and (c == 1 or inner % vec_full == 0) else 1
    run = inner // vec  # vectors of a key's run
    k = _grp_k(run, kind, tn) if c > 1 and inner % vec == 0 else None
    # per-group layouts (every key one run): the tile kernel where the tuning asks for it
    t = _tile_t(run, kind, code, tn) if k is not None and c * inner == n else None
    grid = -(-n // (tn.tile_threads * (t or 1) * vec))  # one tile of tile_threads // 32 * t units a block
    if t is not None and grid < 2**31:
        kern = _get("reduce.cu", f"{kind}_tile{t}", code, vec, device, tn)
        consts = (np.int64(n), *_fastdiv(inner), *_fastdiv(c), *tail_args)
        return steps([step(kern, grid, consts, threads=tn.tile_threads)], True)
    wpb = _THREADS // 32
    if kind == "pact_backward":
        name = "pact_backward_seg"
    elif k is not None:
        name = f"{kind}_grp{k}"  # short aligned runs: K loads per lane, run // K lanes per run
    elif c == 1 or inner >= 4 * 32 * vec:
        name = f"{kind}_seg0"  # long runs: accumulate in registers
    else:
        name = f"{kind}_seg2"  # general: segmented scan
    kern = _get("reduce.cu", name, code, vec, device, tn)
    nsteps = -(-n // (32 * vec * (k or 1)))
    grid = max(1, min(-(-nsteps // wpb), _wave(kern, device, tn.grp_waves if k else tn.seg_waves)))
    # seg: teams of `wil` warps interleave their steps (reduce.cu, seg_body). Per tensor, one
    # team (grid-stride) ran 1-3% faster on an H100 than per-warp ranges; per channel (axis 0),
    # teams of 2-4 blocks ran 2-25% slower, so there each warp keeps its contiguous range.
    team = grid if k is None and c == 1 else 1
    if team > 1:
        grid = max(team, grid // team * team)
    wil = np.int64(team * wpb if team > 1 else 1)
    if kind == "pact_backward":
        consts = (np.int64(n), wil)
    else:
        unique = np.int32(c * inner == n)  # every key is one run (per-group): plain stores
        consts = (np.int64(n), *_fastdiv(inner), *_fastdiv(c), unique, *tail_args, wil)
    return steps([step(kern, grid, consts)], kind != "pact_backward" and k is not None and c * inner == n)  # grp stores


def _tile_t(run: int, kind: str, code: int, tn: KernelTuning) -> Optional[int]:
    """Loads per lane T of the tile kernel for runs of ``run`` vectors, or None (the grp kernel)."""
    t = _by_kind(kind, tn.tile_lsq, tn.tile_minmax, code)
    if not t or run > 32:
        return None
    return t


def _grp_k(run: int, kind: str, tn: KernelTuning) -> Optional[int]:
    """Loads per lane K of a grp kernel for runs of ``run`` vectors (``run = K * L``, L a power of two
    <= 32 lanes), or None where the layout is not one."""
    if run < 1 or run & (run - 1) or run > 32 * max(_GRP_K):
        return None
    k = min(tn.grp_loads_lsq if kind == "lsq_backward" else tn.grp_loads_minmax, run)
    while run // k > 32:
        k *= 2
    return k if k in _GRP_K else None


def _fwd_tile_t(keymode: int, variant: int, code: int, n: int, tn: KernelTuning) -> Optional[int]:
    """Warp steps per warp T of the tile forward, or None (the grid-stride forward)."""
    if keymode != 1 or variant not in (0, 1) or n >= 2**31:
        return None
    return tn.fwd_tile[code] or None


def _forward_plan(x, y, s, z, qmin, qmax, axis, group_size, round_mode, variant, with_mask, tn: KernelTuning,
                  ocode: int) -> _Plan:
    """The launch of a quantize-dequantize forward for these inputs (``s``, ``z`` as ``_params`` gives them)."""
    n = x.numel()
    device = x.device.index
    code = _DTYPE_CODE[x.dtype]
    vec = 16 // _ESIZE[code] if _aligned(x, y) else 1
    if variant == 2:
        inner, c = max(n, 1), 1
    else:
        inner, c = Layout(axis=axis, group_size=group_size).index_rule(x.shape)
    # 0: one parameter; 1: one key per vector (one divide per vector); 2: a key per element;
    # 3: channels on the last axis, parameters read as vectors (see fake_quant.cu)
    if c == 1:
        keymode = 0
    elif inner % vec == 0:
        keymode = 1
    elif inner == 1 and vec > 1 and c % vec == 0 and _aligned(s, z):
        keymode = 3
    else:
        keymode = 2
    nsteps = -(-n // (32 * vec))
    consts = (np.int64(n), *_fastdiv(inner), *_fastdiv(c), np.float32(qmin), np.float32(qmax), np.int32(_ROUND[round_mode]))
    t = _fwd_tile_t(keymode, variant, code, n, tn)
    if t is not None:  # one tile of fwd_tile_threads // 32 * t warp steps a block, 32-bit offsets
        kern = _get("fake_quant.cu", f"fq_forward_t{t}_{variant}_1", code, vec, device, tn, ocode)
        grid = -(-nsteps // (tn.fwd_tile_threads // 32 * t))
        return _Plan(kern, (grid,), tn.fwd_tile_threads, 0, consts, tn, [])
    kern = _get("fake_quant.cu", f"fq_forward_{variant}_{keymode}", code, vec, device, tn, ocode)
    return _Plan(kern, (_elementwise_grid(kern, nsteps, _THREADS // 32, device, tn),), _THREADS, 0, consts, tn, [])


def _forward(x, scale, zero_point, alpha, qmin, qmax, axis, group_size, round_mode, variant, with_mask,
             tn: KernelTuning, out_dtype: Optional[torch.dtype] = None):
    ocode = _out_code(x.dtype, out_dtype)
    if ocode is None:  # no kernel writes this pair: x's dtype, then the cast
        y, mask = _forward(x, scale, zero_point, alpha, qmin, qmax, axis, group_size, round_mode, variant, with_mask, tn)
        return y.to(out_dtype), mask
    xc = x.contiguous()
    n = xc.numel()
    y = torch.empty(x.shape, dtype=_CODE_DTYPE[ocode], device=x.device)
    mask = torch.empty((reference.mask_words(n),), dtype=torch.int32, device=x.device) if with_mask else None
    if n == 0:
        return y, mask
    if variant == 2:
        s = z = None
        a = _params(alpha)
    else:
        s, z, a = _params(scale), _params(zero_point), None
    # the plan depends on the pointers only through their 16-byte alignment (x's; s and z's where the
    # channels are on the last axis): y and mask are fresh allocations, aligned
    key = ("fwd", x.shape, x.dtype, x.device.index, xc.data_ptr() % 16 == 0, variant == 2 or _aligned(s, z), qmin, qmax,
           axis, group_size, round_mode, variant, with_mask, ocode, id(tn))  # fmt: skip
    plan = _plan(key, tn, lambda: _forward_plan(xc, y, s, z, qmin, qmax, axis, group_size, round_mode, variant, with_mask,
                                                tn, ocode))
    _run(plan, (_addr(xc), _addr(y), _addr(mask), _addr(s), _addr(z), _addr(a)), x.device.index)
    return y, mask


# ----------------------------------------------------------------------------- public functions


def fake_quantize_forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    round_mode: str = "half_even",
    out_dtype: Optional[torch.dtype] = None,
    tuning: Optional[KernelTuning] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize-dequantize ``x``; returns ``(x_hat, packed_mask)``, ``x_hat`` in ``out_dtype`` (default
    ``x``'s; see reference). ``tuning``: the kernels' :class:`KernelTuning` (None: :func:`current_tuning`),
    as in every function below."""
    if not _supported(x, scale, zero_point):
        return reference.fake_quantize_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)
    return _forward(x, scale, zero_point, None, qmin, qmax, axis, group_size, round_mode, 0, True, _tn(tuning), out_dtype)


def fake_quantize_backward(
    grad: torch.Tensor, mask: torch.Tensor, dtype: Optional[torch.dtype] = None, tuning: Optional[KernelTuning] = None
) -> torch.Tensor:
    """Clipped-STE backward: ``grad`` where the saved mask bit is set, 0 elsewhere, in ``dtype``
    (``x``'s where the forward wrote another; default ``grad``'s)."""
    dtype = grad.dtype if dtype is None else dtype
    if not _supported(grad, mask) or mask.dtype != torch.int32 or dtype not in _DTYPE_CODE:
        return reference.fake_quantize_backward(grad, mask, dtype)
    if _out_code(dtype, grad.dtype) is None:  # no kernel pairs them: the backward in grad's dtype, then the cast
        return fake_quantize_backward(grad, mask, None, tuning).to(dtype)
    g = grad.contiguous()
    n = g.numel()
    dx = torch.empty(grad.shape, dtype=dtype, device=grad.device)
    if n == 0:
        return dx
    m = mask.contiguous()
    device = grad.device.index
    tn = _tn(tuning)

    def make() -> _Plan:
        code = _DTYPE_CODE[dtype]  # dx is x's dtype; grad is the forward's y's
        vec = 16 // _ESIZE[code] if _aligned(g, dx) else 1
        kern = _get("fake_quant.cu", "fq_backward", code, vec, device, tn, _DTYPE_CODE[grad.dtype])
        nvec = -(-n // vec)
        return _Plan(kern, (_elementwise_grid(kern, nvec, _THREADS, device, tn),), _THREADS, 0, (np.int64(n),), tn, [])

    plan = _plan(("bwd", n, grad.dtype, dtype, device, g.data_ptr() % 16 == 0, id(tn)), tn, make)
    _run(plan, (g.data_ptr(), m.data_ptr(), dx.data_ptr()), device)
    return dx


def fake_quantize_backward_(grad: torch.Tensor, mask: torch.Tensor, tuning: Optional[KernelTuning] = None) -> torch.Tensor:
    """Clipped-STE backward in place: ``grad``'s elements whose mask bit is clear set to 0; returns
    ``grad``. For a gradient in ``x``'s dtype that the caller owns; reads the mask and writes only the
    clipped elements."""
    if not _supported(grad, mask) or mask.dtype != torch.int32 or not grad.is_contiguous():
        return reference.fake_quantize_backward_(grad, mask)
    n = grad.numel()
    if n == 0:
        return grad
    m = mask.contiguous()
    device = grad.device.index
    tn = _tn(tuning)

    def make() -> _Plan:
        kern = _get("fake_quant.cu", "fq_backward_inplace", _DTYPE_CODE[grad.dtype], 1, device, tn)
        grid = _elementwise_grid(kern, reference.mask_words(n), _THREADS, device, tn)
        return _Plan(kern, (grid,), _THREADS, 0, (np.int64(n),), tn, [])

    plan = _plan(("bwd_", n, grad.dtype, device, id(tn)), tn, make)
    _run(plan, (grad.data_ptr(), m.data_ptr()), device)
    return grad


def fake_quantize_lsq_forward(
    x, scale, zero_point, qmin, qmax, axis=None, group_size=None, round_mode="half_even", out_dtype=None, tuning=None
):
    """Forward of the learned-step (LSQ / LSQ+) quantizer (zero point used as clamp(rint(z)))."""
    if not _supported(x, scale, zero_point):
        return reference.fake_quantize_lsq_forward(x, scale, zero_point, qmin, qmax, axis, group_size, round_mode, out_dtype)
    y, _ = _forward(x, scale, zero_point, None, qmin, qmax, axis, group_size, round_mode, 1, False, _tn(tuning), out_dtype)
    return y


def fake_quantize_lsq_backward(
    grad, x, scale, zero_point, qmin, qmax, axis=None, group_size=None, grad_factor=1.0, round_mode="half_even",
    tuning=None,
):
    """Gradients of the LSQ / LSQ+ quantizer, ``(dx, dscale, dzero_point)``, in one pass over x and grad."""
    if not _supported(x, grad, scale, zero_point) or grad.dtype != x.dtype:
        return reference.fake_quantize_lsq_backward(
            grad, x, scale, zero_point, qmin, qmax, axis, group_size, grad_factor, round_mode
        )
    xc = x.contiguous()
    g = (grad if grad.shape == x.shape else grad.reshape(x.shape)).contiguous()
    n = xc.numel()
    dx = torch.empty(x.shape, dtype=grad.dtype, device=x.device)
    inner, c = Layout(axis=axis, group_size=group_size).index_rule(xc.shape)
    ds = torch.empty(scale.shape, dtype=torch.float32, device=x.device)  # c elements, as the kernels write them
    dz = torch.empty(zero_point.shape, dtype=torch.float32, device=x.device)

    def init(poison: bool = False) -> None:  # sums start at 0 (kernels that add into them)
        ds.fill_(math.nan if poison else 0.0)
        dz.fill_(math.nan if poison else 0.0)

    if not n:
        init()
    else:
        s, z = _params(scale), _params(zero_point)
        ptrs = tuple(t.data_ptr() for t in (xc, g, dx, s, z, ds, dz))
        _launch_reduce("lsq_backward", xc, g, dx, n, inner, c, _lsq_tail(qmin, qmax, grad_factor, round_mode), ptrs,
                       x.device.index, _tn(tuning), init=init)  # fmt: skip
    return dx, ds, dz


@functools.lru_cache(maxsize=1024)
def _lsq_tail(qmin: int, qmax: int, grad_factor: float, round_mode: str) -> tuple:
    """The LSQ backward kernels' last scalar arguments (also part of their launch key)."""
    return np.float32(qmin), np.float32(qmax), np.float32(grad_factor), np.int32(_ROUND[round_mode])


def fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode="half_even", out_dtype=None, tuning=None):
    """PACT forward: clip to ``[0, alpha]``, quantize with ``s = alpha / (qmax - qmin)``, ``z = qmin``."""
    if not _supported(x, alpha):
        return reference.fake_quantize_pact_forward(x, alpha, qmin, qmax, round_mode, out_dtype)
    y, _ = _forward(x, None, None, alpha, qmin, qmax, None, None, round_mode, 2, False, _tn(tuning), out_dtype)
    return y


def fake_quantize_pact_backward(grad, x, alpha, tuning=None):
    """PACT gradients ``(dx, dalpha)`` in one pass."""
    if not _supported(x, grad, alpha) or grad.dtype != x.dtype:
        return reference.fake_quantize_pact_backward(grad, x, alpha)
    xc, g = x.contiguous(), grad.reshape(x.shape).contiguous()
    n = xc.numel()
    dx = torch.empty(x.shape, dtype=grad.dtype, device=x.device)
    da = torch.zeros(1, dtype=torch.float32, device=x.device)
    if n:
        a = _params(alpha)
        ptrs = tuple(t.data_ptr() for t in (xc, g, dx, a, da))
        _launch_reduce("pact_backward", xc, g, dx, n, n, 1, (), ptrs, x.device.index, _tn(tuning))
    return dx, da.reshape(alpha.shape)


# ----------------------------------------------------------------------------- observer


def _aminmax_use_kernel(x: torch.Tensor, axis: Optional[int], group_size: Optional[int], tn: KernelTuning) -> bool:
    """Where the kernel beat PyTorch's reductions on an H100 (benchmarks/results/kernels_h100.md, 64M
    elements): per-group and per-channel on a non-leading axis always (1.8-4x), float16 / bfloat16
    everywhere (1.2-1.5x); float32 per-tensor and per-channel on axis 0 where the rows kernels take
    them (95 us against torch.aminmax's 106-107), torch.aminmax on the rest of those (the seg kernel
    measured 0.97x of it)."""
    if group_size is not None or x.dtype != torch.float32:
        return True
    if axis is not None and axis % x.dim() != 0:
        return True
    if x.is_contiguous() and not _aligned(x):
        return False  # scalar loads: neither rows kernel applies
    inner, c = Layout(axis=axis, group_size=group_size).index_rule(x.shape)
    if c == 1:
        return _tensor_rows("minmax", x.numel(), 1, 4, x.device.index, tn) is not None
    return inner % 4 == 0 and _use_rows(inner, c, 4, tn)


def aminmax_torch(x: torch.Tensor, axis: Optional[int] = None, group_size: Optional[int] = None):
    """:func:`aminmax` through PyTorch's reductions (the fastest formulation we found): what
    :func:`aminmax` runs off the GPU and where the kernel did not win, and the benchmarks' baseline.

    Example::

        >>> aminmax_torch(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), group_size=2)
        (tensor([[-2.0000],
                [ 0.5000]]), tensor([[1.],
                [3.]]))
    """
    mn, mx = Layout(axis=axis, group_size=group_size).aminmax(x)
    return mn, mx


def _aminmax_kernel(x: torch.Tensor, axis: Optional[int] = None, group_size: Optional[int] = None,
                    tuning: Optional[KernelTuning] = None):
    """Min/max per parameter with the fused kernel (NaN ignored)."""
    xc = x.contiguous()
    n = xc.numel()
    inner, c = Layout(axis=axis, group_size=group_size).index_rule(xc.shape)
    mn = torch.empty((c,), dtype=torch.float32, device=x.device)
    mx = torch.empty((c,), dtype=torch.float32, device=x.device)

    def init(poison: bool = False) -> None:  # kernels that take atomic min / max start from +-inf
        mn.fill_(math.nan if poison else math.inf)
        mx.fill_(math.nan if poison else -math.inf)

    if not n:
        init()
    else:
        ptrs = (xc.data_ptr(), mn.data_ptr(), mx.data_ptr())
        _launch_reduce("minmax", xc, None, None, n, inner, c, (), ptrs, x.device.index, _tn(tuning), init=init)
    shape = Layout(axis=axis, group_size=group_size).param_shape(x.shape)
    return mn.reshape(shape), mx.reshape(shape)


def aminmax(x: torch.Tensor, axis: Optional[int] = None, group_size: Optional[int] = None,
            tuning: Optional[KernelTuning] = None):
    """Per-tensor / per-channel / per-group ``(min, max)`` of ``x`` as float32, parameter-shaped.

    Shapes follow the parameters of :func:`qat.kernels.fake_quantize`: ``(1,)`` per tensor,
    ``(x.shape[axis],)`` per channel, ``x.shape[:-1] + (x.shape[-1] // group_size,)`` per group.
    Runs the fused kernel where it beat ``torch.aminmax`` on an H100 (:func:`_aminmax_use_kernel`),
    PyTorch's reductions elsewhere and off the GPU. NaN is ignored by the kernel (``fminf``) but
    propagated by PyTorch.

    Example::

        >>> mn, mx = aminmax(torch.tensor([[1.0, -2.0], [3.0, 0.5]]), axis=0)
        >>> mn, mx
        (tensor([-2.0000,  0.5000]), tensor([1., 3.]))
    """
    tn = _tn(tuning)
    if _supported(x) and _aminmax_use_kernel(x, axis, group_size, tn):
        return _aminmax_kernel(x, axis, group_size, tn)
    return aminmax_torch(x, axis, group_size)


# ----------------------------------------------------------------------------- range of the data


@functools.lru_cache(maxsize=None)
def _divides_by_reciprocal(device: int) -> bool:
    """Whether PyTorch's CUDA true division of a float32 tensor by a Python number multiplies by the
    float32 reciprocal (it does, ``BinaryDivTrueKernel.cu``), which ``qparams_from_range`` then does:
    probed once a device (one sync), so the kernel follows whatever this torch build computes."""
    a = torch.arange(1, 4097, device=f"cuda:{device}", dtype=torch.float32) * 1.2345678
    inv = torch.tensor(float(np.float32(1.0) / np.float32(7.5)), device=a.device, dtype=torch.float32)
    return bool(torch.equal(a / 7.5, a * inv))


def _rows_vec(x: torch.Tensor, y: torch.Tensor, row: int, code: int) -> Optional[int]:
    """Vector width of an fq_rows launch for rows of ``row`` elements, or None (the reference)."""
    vec = 16 // _ESIZE[code]
    if row % vec or not _aligned(x, y):
        vec = 1
    if row % 32 or row // vec > 32 * _ROWS_NV[-1]:
        return None
    return vec


def fake_quantize_minmax_forward(
    x: torch.Tensor,
    row: int,
    qmin: int,
    qmax: int,
    symmetric: bool,
    scale_f16: bool = False,
    round_mode: str = "half_even",
    state: Optional[tuple] = None,
    out_dtype: Optional[torch.dtype] = None,
    tuning: Optional[KernelTuning] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize each contiguous row of ``row`` elements with its own finite min / max (see the
    reference, :func:`qat.kernels.reference.fake_quantize_minmax_forward`), in one kernel: one warp a
    row (``row % 32 == 0``, at most 512 16-byte vectors), reading ``x`` once. ``state``: the observer's
    ``(min_val, max_val, seen, scale, zero_point)``, updated in place. Returns ``(x_hat, packed_mask)``,
    ``x_hat`` in ``out_dtype`` (default ``x``'s)."""
    n = x.numel()
    ok = _supported(x, *(state or ())) and n > 0 and row > 0 and n % row == 0
    ocode = _out_code(x.dtype, out_dtype) if ok else None
    if ok and state is not None:
        nrows = n // row
        ok = all(t.is_contiguous() and t.numel() == nrows for t in state) and state[2].dtype == torch.bool and all(
            t.dtype == torch.float32 for t in (state[0], state[1], state[3], state[4])
        )
    if ok and ocode is not None:
        xc = x.contiguous()
        y = torch.empty(x.shape, dtype=_CODE_DTYPE[ocode], device=x.device)
        code = _DTYPE_CODE[x.dtype]
        vec = _rows_vec(xc, y, row, code)
        ok = vec is not None
    if not ok or ocode is None:  # PyTorch's reductions for the range, this backend's forward where it takes x
        rows, s, z = reference.minmax_qparams(x, row, qmin, qmax, symmetric, scale_f16, state)
        y, mask = fake_quantize_forward(rows, s, z, qmin, qmax, None, row, round_mode, out_dtype, tuning)
        return y.reshape(x.shape), mask
    device = x.device.index
    tn = _tn(tuning)

    def make() -> _Plan:
        nvec = row // vec
        nv = next(k for k in _ROWS_NV if 32 * k >= nvec)
        nrows = n // row
        kern = _get("rows.cu", f"fq_rows_{nv}", code, vec, device, tn, ocode)
        scheme = 2 if not symmetric else (0 if qmin < 0 else 1)
        div = (qmax - qmin) / 2 if scheme == 0 else float(qmax - qmin)
        consts = (
            np.int64(nrows), np.int32(nvec), np.float32(qmin), np.float32(qmax), np.int32(scheme), np.float32(div),
            np.float32(1.0) / np.float32(div), np.int32(_divides_by_reciprocal(device)), np.int32(bool(scale_f16)),
            np.int32(_ROUND[round_mode]),
        )  # fmt: skip
        return _Plan(kern, (-(-nrows // (_THREADS // 32)),), _THREADS, 0, consts, tn, [])

    plan = _plan(("rows", n, x.dtype, ocode, device, vec, row, qmin, qmax, symmetric, scale_f16, round_mode, id(tn)), tn,
                 make)
    mask = torch.empty((reference.mask_words(n),), dtype=torch.int32, device=x.device)
    # the state pointers go after the scalars (rows.cu's argument order)
    _run(plan, (xc.data_ptr(), y.data_ptr(), mask.data_ptr()), device, tuple(_addr(t) for t in (state or (None,) * 5)))
    return y, mask


# ----------------------------------------------------------------------------- microscaling / FP8

_MX_ELEM = {"e2m1": 0, "e4m3": 1, "e5m2": 2}
_MX_KIND = {"none": 0, "e8m0": 1, "e4m3": 2}


def _mx_args(x, element, block_size, block_scale, scale, axis):
    """``(inner, C, elem, block, kind, scale)`` kernel arguments (a dummy one-element scale for E8M0)."""
    if block_scale == "none" and axis is not None:
        inner, c = Layout(axis=axis).index_rule(tuple(x.shape))
    else:
        inner, c = max(x.numel(), 1), 1
    s = _params(scale) if scale is not None else torch.ones(1, dtype=torch.float32, device=x.device)
    return (np.int64(inner), np.int64(c), np.int32(_MX_ELEM[element]), np.int32(block_size),
            np.int32(_MX_KIND[block_scale]), s)  # fmt: skip


def _mx_grid(kern, n: int, device: int, tn: KernelTuning) -> int:
    return _elementwise_grid(kern, -(-n // 32), _THREADS // 32, device, tn)


def microscaling_forward(x, element, block_size, block_scale, scale=None, axis=None, tuning=None):
    """Float-format quantize-dequantize (``microscaling.cu``'s ``mx_forward``): ``(y, packed mask)``,
    as :func:`qat.kernels.reference.microscaling_forward`; the mask goes to :func:`fake_quantize_backward`."""
    if not _supported(x, scale) or (scale is not None and not scale.is_cuda):
        return reference.microscaling_forward(x, element, block_size, block_scale, scale, axis)
    xc = x.contiguous()
    n = xc.numel()
    inner, c, elem, block, kind, s = _mx_args(xc, element, block_size, block_scale, scale, axis)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mask = torch.empty((reference.mask_words(n),), dtype=torch.int32, device=x.device)
    device = x.device.index
    tn = _tn(tuning)
    kern = _get("microscaling.cu", "mx_forward", _DTYPE_CODE[x.dtype], 1, device, tn)
    args = (_ptr(xc), _ptr(y), _ptr(mask), _ptr(s), np.int64(n), inner, c, elem, block, kind)
    _launch(kern, _mx_grid(kern, n, device, tn), args, device)
    return y, mask


def microscaling_lsq_backward(grad, x, element, block_size, block_scale, scale, axis, grad_factor, tuning=None):
    """``(dx, dscale)`` of a learned float-format scale (``mx_lsq_backward``), as
    :func:`qat.kernels.reference.microscaling_lsq_backward` (``dscale`` summed with float atomics: equal
    up to the order of the sum)."""
    if not _supported(x, grad, scale) or grad.dtype != x.dtype or not scale.is_cuda:
        return reference.microscaling_lsq_backward(grad, x, element, block_size, block_scale, scale, axis, grad_factor)
    xc, g = x.contiguous(), grad.contiguous()
    n = xc.numel()
    inner, c, elem, block, kind, s = _mx_args(xc, element, block_size, block_scale, scale, axis)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    ds = torch.zeros(scale.numel(), dtype=torch.float32, device=x.device)
    device = x.device.index
    tn = _tn(tuning)
    kern = _get("microscaling.cu", "mx_lsq_backward", _DTYPE_CODE[x.dtype], 1, device, tn)
    args = (_ptr(g), _ptr(xc), _ptr(dx), _ptr(ds), _ptr(s), np.int64(n), inner, c, elem, block, kind)
    _launch(kern, _mx_grid(kern, n, device, tn), args, device)
    return dx, (ds * grad_factor).reshape(scale.shape)
