"""Kernel tuning of the CuPy backend: every launch-shape, dispatch and compile-time setting in one
frozen object.

:class:`KernelTuning` holds each knob that a measurement set (the numbers in the field docstrings are
from the H100 sweeps v2-v12 of ``research/NOTES_kernels.md``, 64M elements, forward + backward; the
sweep files are in commit c8ba9c9, ``benchmarks/results/kernels_h100_v*_sweep.md``). Fields of two kinds:

* host fields: grid sizes, dispatch thresholds and which kernel a layout takes, read by
  :mod:`qat.kernels.cupy_backend` at each launch;
* device fields (``metadata["macro"]``): compile-time constants of ``csrc/*.cu``, rendered by
  :meth:`KernelTuning.defines` into NVRTC ``-D`` options. The sources keep no defaults of their own
  (a missing define is an ``#error``), so this object is the one owner of every tuned value, and the
  backend's compile cache keys on those defines.

:data:`DEFAULT_TUNING` is what the backend uses. A sweep builds another with
``dataclasses.replace(DEFAULT_TUNING, cols_rows_lsq=2)`` and passes it to a backend function
(``tuning=``) or installs it for a block with ``cupy_backend.use_tuning(...)``; see
``benchmarks/kernels.py --set / --sweep``.

Values that are "by dtype" are :class:`ByDtype` triples indexed by the backend's dtype code
(0 float32, 1 float16, 2 bfloat16); a plain tuple of three is accepted and converted.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

__all__ = ["ByDtype", "KernelTuning", "DEFAULT_TUNING", "tuning_from"]


class ByDtype(NamedTuple):
    """One value per storage dtype, indexed by the backend's dtype code (0, 1, 2)."""

    fp32: int
    fp16: int
    bf16: int


def _macro(name: str, default, by_dtype: bool = False):
    """A device field: rendered as ``-D<name>=<value>`` (the dtype's value where ``by_dtype``)."""
    return field(default=default, metadata={"macro": name, "by_dtype": by_dtype})


@dataclass(frozen=True)
class KernelTuning:
    """Tuning of the fused fake-quant kernels (immutable; derive variants with ``dataclasses.replace``).

    Every field is a setting the default code path uses; settings that measured no gain were removed
    with their code paths (``research/NOTES_kernels.md``, "Kernel tuning: one object")."""

    # ------------------------------------------------------------------ launches (host)
    param_block: bool = True
    """Planned launches (the quantize-dequantize forward, the clipped-STE backward, the range-of-the-data
    forward, the reductions) go straight to ``cuLaunchKernel`` with a parameter block laid out once per
    plan, the pointers written per call, rather than through CuPy's conversion of every argument
    (``benchmarks/quantizer_host_cost.py --tuning param_block=False`` measures the other way; an H100:
    ``benchmarks/results/quantizer_host_cost_h100.md``)."""

    # ------------------------------------------------------------------ element-wise kernels (host)
    elementwise_waves: float = 8
    """Grid of the forward (``fq_forward_<variant>_<keymode>``) and clipped-STE backward kernels, in full
    waves (SMs x resident blocks); the kernels stride over the rest. 8 measured 2-4% faster than 1 on an
    H100 (v2); one block per 16 warp steps (no grid-stride loop) measured 0.993-0.995, not taken (v9b)."""

    fwd_tile: ByDtype = ByDtype(1, 0, 0)
    """Tile forward of key mode 1 (per-group, and channels whose inner size is a multiple of the vector;
    ``fq_forward_t<T>_<variant>_1``): warp steps per warp T (1, 2 or 4) by dtype, 0 = the grid-stride
    forward. One tile a block, 32-bit offsets (tensors of 2**31 elements or more keep the grid-stride
    kernel). fp32 T 1: fwd + bwd 0.959 of the grid-stride kernel (v11, LSQ fp32 group128 482.4 -> 467.2
    us); 16-bit 0.990-0.995, off."""

    fwd_tile_threads: int = 128
    """Threads of a tile-forward block (a multiple of 32, 32-256): 128 was the v11 pick (mean 0.9593,
    256 threads 0.9597)."""

    # ------------------------------------------------------------------ reductions: dispatch (host)
    seg_waves: float = 1
    """Grid of the seg kernels (long runs and the general segmented scan), in full waves."""

    rows_min_vecs: int = 1024
    """A channel layout whose runs (one key's contiguous elements) hold at least this many vectors goes to
    the rows kernels (one block per row, no per-element keys); also the shortest virtual row of
    :attr:`tensor_rows`. v8: aminmax fp32 channel0 1.215 -> 1.012 of the copy, LSQ fp32 1.132 -> 1.052."""

    tensor_rows: int = 8192
    """Per-tensor LSQ backward and min/max (one parameter) on the rows kernels: the tensor cut into about
    this many virtual rows of at least :attr:`rows_min_vecs` vectors, one atomic a row (the tail past the
    last whole row on the seg kernel). v12: LSQ fp32 per-tensor 494.6 -> 461.3 us, min/max fp32 107.3 ->
    94.7 (4096 rows 0.944 mean, 2048 0.957, 8192 0.936)."""

    tensor_rows_min_waves: int = 4
    """... only where that gives at least this many rows per SM (smaller tensors keep the seg kernel)."""

    cols_max_width: int = 1024
    """A ``(C, inner)`` layout with ``C * inner`` at most this wide (or ``inner == 1``: channels on the last
    axis) goes to the cols kernels (a thread owns columns and walks rows)."""

    cols_vecs: int = 32
    """Cols kernels: vectors (columns / vector width) a block spans; its other threads take other rows.
    64 and 128 measured 4-7% slower (v6). The grid fits one wave (v8: aminmax bf16 channel1 1.435 ->
    1.150 of the copy against rounding up)."""

    cols_half_lsq: ByDtype = ByDtype(False, True, True)
    """LSQ backward on the colsh kernels (cols with half vectors: 8-byte accesses, half the registers) by
    dtype. v11: bf16 / fp16 channel1 0.974 / 0.967 of cols; fp32 0.990-0.997, off."""

    cols_half_minmax: ByDtype = ByDtype(True, True, True)
    """min/max on the colsh kernels by dtype. v11: fp32 / bf16 / fp16 channel1 0.906 / 0.962 / 0.959."""

    cols_half_vecs: int = 64
    """colsh kernels: half vectors a block spans. v11: 64 (score -0.232) over 32 (-0.227); v12: 128 1.010,
    32 0.998."""

    grp_loads_lsq: int = 2
    """grp kernels (short aligned runs: L lanes share a run of K * L vectors), preferred loads per lane K
    (1, 2, 4 or 8; raised where a run is longer than 32 lanes) of the LSQ backward. v6: 2 best; v9: 1
    0.995, 4 1.10-1.13 (spills); v9b fp32 4: 12.7% slower."""

    grp_loads_minmax: int = 2
    """The same for min/max. v6: 1 was 30% slower, 4-8 5-10% slower."""

    grp_waves: float = 16
    """Grid of the grp kernels in full waves (v6: 16 over 4 and 8; one unit per warp 1.014, v9)."""

    tile_lsq: ByDtype = ByDtype(4, 2, 2)
    """Tile kernels (per-group layouts whose run is at most 32 vectors, launched one tile a block as
    Inductor's persistent reductions): loads per lane T (2, 4 or 8) of the LSQ backward by dtype, 0 = the
    grp kernel. v10: LSQ fp32 / bf16 / fp16 group128 0.960 / 0.963 / 0.971 of grp."""

    tile_minmax: ByDtype = ByDtype(4, 2, 4)
    """The same for min/max. v10: fp32 / fp16 / bf16 group128 0.967 / 0.873 / 0.938."""

    tile_threads: int = 128
    """Threads of a tile kernel's block (a multiple of 32, 32-256). v10: 128 (64 and 256 within 1%)."""

    # ------------------------------------------------------------------ reductions: compile time (device)
    seg_steps_lsq: int = _macro("QAT_SEG_STEPS_LSQ", 2)
    """seg kernels of the LSQ and PACT backward: warp steps a warp loads before working on them. 4 spilled
    and ran 20-30% slower (v6)."""

    seg_steps_minmax: int = _macro("QAT_SEG_STEPS_MM", 2)
    """seg kernels of min/max: the same."""

    rows_loads_lsq: int = _macro("QAT_ROWS_U_LSQ", 4)
    """rows kernels of the LSQ backward: vectors (of x and of grad) a thread loads before working on them.
    v8: 2 within 1.5% of 4, 8 1.13-1.19."""

    rows_loads_minmax: int = _macro("QAT_ROWS_U_MM", 8)
    """rows kernels of min/max: the same. v8: 4 1.03-1.06, 16 1.08-1.24 (8: 1.01-1.09)."""

    cols_rows_lsq: int = _macro("QAT_COLS_ROWS_LSQ", 4)
    """cols kernels of the LSQ backward: rows a thread loads before working on them. v6: 4 (bf16 channel1
    1.60 -> 1.27); v10: 2 0.989-0.992, not taken."""

    cols_rows_minmax: int = _macro("QAT_COLS_ROWS_MM", 8)
    """cols kernels of min/max: the same. v6: 8 (2 and 4 worse); v10: 4 1.003-1.008, 6 0.999-1.017."""

    colsh_rows_lsq: int = _macro("QAT_COLSH_ROWS_LSQ", 4)
    """colsh kernels of the LSQ backward: rows in flight a thread (as cols; the v11 colsh sweep ran 4)."""

    colsh_rows_minmax: int = _macro("QAT_COLSH_ROWS_MM", 8)
    """colsh kernels of min/max: the same (v11 ran 8)."""

    lsq_min_blocks: ByDtype = _macro("QAT_LSQ_MINB", ByDtype(4, 3, 3), by_dtype=True)
    """Minimum resident blocks per SM (``__launch_bounds__``, caps registers) of the LSQ seg, grp and rows
    kernels by dtype: fp32 4 (64 registers) ran 5% faster than 3, 16-bit 3 about 2% faster than 4 (v6);
    5 in fp32: 1.06 (v9)."""

    # ------------------------------------------------------------------ tests (host)
    poison_outputs: bool = False
    """Tests: before a reduction that stores every key (tile, grp on per-group layouts, rows with one
    block per key), fill its outputs with NaN, so a key it leaves unwritten fails the parity checks
    instead of reading whatever the allocator's block held. Not a speed setting."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type in ("ByDtype", ByDtype):
                v = getattr(self, f.name)
                if not isinstance(v, ByDtype):
                    object.__setattr__(self, f.name, ByDtype(*v))
        problems = []

        def need(ok: bool, what: str) -> None:
            if not ok:
                problems.append(what)

        for name in ("elementwise_waves", "seg_waves", "grp_waves"):
            need(getattr(self, name) > 0, f"{name} > 0")
        for name in ("rows_min_vecs", "tensor_rows", "cols_max_width", "seg_steps_lsq", "seg_steps_minmax",
                     "rows_loads_lsq", "rows_loads_minmax", "cols_rows_lsq", "cols_rows_minmax", "colsh_rows_lsq",
                     "colsh_rows_minmax"):  # fmt: skip
            need(int(getattr(self, name)) >= 1, f"{name} >= 1")
        need(isinstance(self.param_block, bool), "param_block a bool")
        need(self.tensor_rows_min_waves >= 0, "tensor_rows_min_waves >= 0")
        for name in ("cols_vecs", "cols_half_vecs"):
            need(1 <= getattr(self, name) <= 256, f"{name} in 1..256")
        need(all(t in (0, 1, 2, 4) for t in self.fwd_tile), "fwd_tile values in (0, 1, 2, 4)")
        for name in ("tile_lsq", "tile_minmax"):
            need(all(t in (0, 2, 4, 8) for t in getattr(self, name)), f"{name} values in (0, 2, 4, 8)")
        for name in ("fwd_tile_threads", "tile_threads"):
            v = getattr(self, name)
            need(v % 32 == 0 and 32 <= v <= 256, f"{name} a multiple of 32 in 32..256")
        for name in ("grp_loads_lsq", "grp_loads_minmax"):
            need(getattr(self, name) in (1, 2, 4, 8), f"{name} in (1, 2, 4, 8)")
        need(all(m >= 1 for m in self.lsq_min_blocks), "lsq_min_blocks >= 1")
        if problems:
            raise ValueError("KernelTuning: " + "; ".join(problems))
        # rendered once (the backend reads them at every launch); not a field: no part of eq / hash / repr
        object.__setattr__(self, "_defines", tuple(self._render(code) for code in range(3)))

    def _render(self, dtype_code: int) -> tuple[str, ...]:
        out = []
        for f in dataclasses.fields(self):
            macro = f.metadata.get("macro")
            if macro is None:
                continue
            v = getattr(self, f.name)
            if f.metadata["by_dtype"]:
                v = v[dtype_code]
            out.append(f"-D{macro}={int(v)}")
        return tuple(out)

    def defines(self, dtype_code: int) -> tuple[str, ...]:
        """The device fields as NVRTC options (``-DQAT_COLS_ROWS_LSQ=4`` ...) for one dtype code (0
        float32, 1 float16, 2 bfloat16): what the sources' tuning macros are compiled with."""
        return self._defines[dtype_code]

    def changes(self) -> dict:
        """The fields that differ from :data:`DEFAULT_TUNING` (for a benchmark's header)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(DEFAULT_TUNING, f.name)}  # fmt: skip


#: the tuning the backend uses (the measured defaults above)
DEFAULT_TUNING = KernelTuning()


def tuning_from(items, base: KernelTuning = DEFAULT_TUNING) -> KernelTuning:
    """``base`` with ``FIELD=VALUE`` items applied, the values Python literals (``4``, ``(2,2,2)``,
    ``False``): what the benchmarks' ``--set`` / ``--tuning`` options take.

    Raises:
        ValueError: an item that is not an assignment of a field, a value that is not a literal, or
            a tuning that :class:`KernelTuning` refuses.

    Example::

        >>> tuning_from(["param_block=False", "tile_lsq=(2,2,2)"]).changes()
        {'param_block': False, 'tile_lsq': ByDtype(fp32=2, fp16=2, bf16=2)}
    """
    fields = {f.name for f in dataclasses.fields(KernelTuning)}
    changes = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"not a KernelTuning field assignment: {item!r} (fields: {', '.join(sorted(fields))})")
        try:
            changes[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise ValueError(f"{item!r}: the value must be a Python literal ({exc})") from exc
    try:
        return dataclasses.replace(base, **changes)
    except TypeError as exc:
        raise ValueError(str(exc)) from exc
