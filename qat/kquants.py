"""llama.cpp k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): the two-level fake quantization, the GGUF
block bytes of the very codes and scales it used, and llama.cpp's Q4_K_M / Q5_K_M mixes as plans.

A k-quant splits a row into super-blocks of 256 weights (``QuantSpec(granularity="per_group",
group_size=256, format="q4_k")``), each into blocks of 16 or 32. A block has a scale (and, for the
``min`` types, a min) that is itself an integer code against the super-block's float16 ``d`` (and
``dmin``); the weights are integer codes against the block's scale:

======  =====  ==========  =============  ===================  ============================
type    block  weight q    block codes    super-block          dequantized weight
======  =====  ==========  =============  ===================  ============================
Q2_K    16     0..3        sc, m: 0..15   d, dmin (float16)    ``(d*sc)*q - dmin*m``
Q3_K    16     -4..3       sc: -32..31    d (float16)          ``(d*sc)*q``
Q4_K    32     0..15       sc, m: 0..63   d, dmin (float16)    ``(d*sc)*q - dmin*m``
Q5_K    32     0..31       sc, m: 0..63   d, dmin (float16)    ``(d*sc)*q - dmin*m``
Q6_K    16     -32..31     sc: -128..127  d (float16)          ``(d*sc)*q``
======  =====  ==========  =============  ===================  ============================

A row whose length is not a multiple of 256 cannot hold super-blocks; there, as ``llama-quantize``
does, the weight gets the fallback type of 32-weight blocks (:data:`FALLBACK`: Q2_K / Q3_K ->
Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, as llama.cpp of llama-cpp-python 0.3.36 assigns them),
one float16 scale (and min) a block.

Every product there is exact in float32 (at most 24 significant bits), so ``d*sc*q - dmin*m``
has one rounding, the subtraction: the fake-quantized weight equals what ``gguf.quants.dequantize``
and llama.cpp compute from the blocks :func:`kquant_blocks` writes, bit for bit. The rule that
picks the codes is ``docs/math.md``, section "llama.cpp k-quants". The gradient is the clipped
straight-through estimate to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import numpy as np
import torch

from .errors import QATConfigError
from .spec import check_format_fields

__all__ = ["KQuant", "KQUANTS", "QK_K", "FALLBACK", "gguf_type_of", "check_kquant_spec", "kquant_parts", "kquant_dequantize",
           "fake_quantize_kquant", "kquant_blocks", "kquant_mix_plan", "KQUANT_MIXES", "KQUANT_ESTIMATORS", "SUPER_UNIT",
           "kquant_learned_init", "kquant_learned_shapes"]

#: The estimators a k-quant weight takes: ``ste`` (both levels searched from the weight at every
#: step) and ``lsq`` (both levels learned: :func:`kquant_learned_init`, :func:`fake_quantize_kquant`).
KQUANT_ESTIMATORS = ("ste", "lsq")

QK_K = 256  # weights per super-block
QK = 32  # weights per block of the fallback types

#: llama.cpp's type for a k-quant weight whose rows are not a multiple of 256 (``llama-quantize``)
FALLBACK = {"q2_k": "Q4_0", "q3_k": "Q4_0", "q4_k": "Q5_0", "q5_k": "Q5_1", "q6_k": "Q8_0"}

# the fallback types with one signed scale a block: code range (the signed extreme maps to the low end)
_SIGNED_FALLBACK = {"Q8_0": (-127, 127), "Q5_0": (-16, 15), "Q4_0": (-8, 7)}


@dataclass(frozen=True)
class KQuant:
    """One k-quant type: its block size and code ranges (see the module's table).

    Example::

        >>> KQUANTS["q4_k"].ggml_name, KQUANTS["q4_k"].block, KQUANTS["q4_k"].bytes_per_block
        ('Q4_K', 32, 144)
    """

    ggml_name: str
    bits: int
    block: int  # weights per block
    qmin: int  # weight codes
    qmax: int
    scale_max: int  # block codes: min types 0..scale_max; symmetric types -scale_max..scale_max-1
    has_min: bool
    bytes_per_block: int  # bytes per 256-weight super-block

    @property
    def signed(self) -> bool:
        return not self.has_min


#: The k-quant types by ``QuantSpec.format`` value.
KQUANTS: dict[str, KQuant] = {
    "q2_k": KQuant("Q2_K", 2, 16, 0, 3, 15, True, 84),
    "q3_k": KQuant("Q3_K", 3, 16, -4, 3, 32, False, 110),
    "q4_k": KQuant("Q4_K", 4, 32, 0, 15, 63, True, 144),
    "q5_k": KQuant("Q5_K", 5, 32, 0, 31, 63, True, 176),
    "q6_k": KQuant("Q6_K", 6, 16, -32, 31, 128, False, 210),
}


def _kq(fmt: str) -> KQuant:
    try:
        return KQUANTS[fmt]
    except KeyError:
        raise QATConfigError(f"k-quant format must be one of {sorted(KQUANTS)}, got {fmt!r}") from None


def check_kquant_spec(spec: Any) -> None:
    """Refuse a ``QuantSpec`` whose ``format`` is a k-quant but whose other fields say otherwise:
    a k-quant fixes ``bits``, ``signed``, ``symmetric``, the granularity (``per_group``, 32: the
    block a row must divide into; super-blocks of 256 where it divides into those),
    ``scale_dtype: float16`` and ``round_mode: half_even``, and is a weight format (not ``dynamic``)
    with one of :data:`KQUANT_ESTIMATORS`.

    Example::

        >>> from qat import QuantSpec
        >>> QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_group", group_size=32,
        ...           scale_dtype="float16", format="q4_k").format.value
        'q4_k'
        >>> QuantSpec(bits=4, granularity="per_group", group_size=32, format="q4_k")
        Traceback (most recent call last):
        ...
        qat.errors.QATConfigError: QuantSpec.format q4_k needs signed=False (got True), symmetric=False (got True), scale_dtype='float16' (got 'float32'); a Q4_K weight is {bits: 4, signed: false, symmetric: false, granularity: per_group, group_size: 32, scale_dtype: float16, round_mode: half_even, dynamic: false, estimator: ste|lsq}
    """
    fmt = spec.format.value
    kq = _kq(fmt)
    want = {
        "bits": kq.bits, "signed": kq.signed, "symmetric": kq.signed, "granularity": "per_group", "group_size": QK,
        "scale_dtype": "float16", "round_mode": "half_even", "dynamic": False,
    }
    check_format_fields(spec, f"{kq.ggml_name} weight", want, list(KQUANT_ESTIMATORS))


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-65504.0, 65504.0).half().float()


def _signed_extreme(x: torch.Tensor) -> torch.Tensor:
    """The element of largest magnitude along the last axis, with its sign (the first on ties)."""
    idx = x.abs().argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1)


def gguf_type_of(fmt: str, row_length: int) -> str:
    """The ggml type a k-quant ``fmt`` weight with rows of ``row_length`` is stored in: the k-quant
    when the row is a multiple of 256, else its :data:`FALLBACK` (a multiple of 32).

    Example::

        >>> gguf_type_of("q4_k", 1536), gguf_type_of("q4_k", 384), gguf_type_of("q6_k", 384)
        ('Q4_K', 'Q5_0', 'Q8_0')
    """
    kq = _kq(fmt)
    if row_length % QK_K == 0:
        return kq.ggml_name
    if row_length % QK == 0:
        return FALLBACK[fmt]
    raise QATConfigError(
        f"{kq.ggml_name} needs rows whose length is a multiple of {QK_K} (or of {QK}, for its fallback "
        f"{FALLBACK[fmt]}), got rows of {row_length}"
    )


def _fallback_fit(x: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's float16 block scale ``d`` (S,) of a Q8_0 / Q5_0 / Q5_1 / Q4_0 block of 32 (``x``:
    (S, 32)), and ``m`` (S,), the Q5_1 min (else 0)."""
    m = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    if qtype == "Q5_1":  # w = d * q + m, q in 0..31 (ggml's quantize_row_q5_1_ref)
        mn, mx = x.amin(-1), x.amax(-1)
        return _fp16((mx - mn) / 31), _fp16(mn)
    if qtype == "Q8_0":  # w = d * q, q in -127..127, d = amax / 127
        return _fp16(x.abs().amax(-1) / 127), m
    # Q5_0, Q4_0: the signed extreme maps to the most negative code (-16, -8)
    return _fp16(_signed_extreme(x) / _SIGNED_FALLBACK[qtype][0]), m


def _fallback_codes(x: torch.Tensor, qtype: str, d: torch.Tensor, m: torch.Tensor) -> dict[str, Any]:
    """The parts of ``x`` (S, 32) against the float16 block scale ``d`` (S,) (and Q5_1 min ``m``)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    out: dict[str, Any] = {"type": qtype}
    if qtype == "Q5_1":
        v = (x - m.unsqueeze(-1)) / d.unsqueeze(-1)
        lo, hi = 0, 31
    else:
        v = x / d.unsqueeze(-1)
        lo, hi = _SIGNED_FALLBACK[qtype]
    v = torch.where((d != 0).unsqueeze(-1), v, zero)
    # Q5_0 / Q4_0: ggml's (int)(x * id + 16.5) - 16 and (int)(x * id + 8.5) - 8, i.e. half up
    r = torch.floor(v + 0.5) if qtype in ("Q5_0", "Q4_0") else torch.round(v)
    q = torch.clamp(r, lo, hi)
    inside = r == q
    out.update(d=d, m=m, q=q, inside=inside | ~torch.isfinite(v))
    return out


def _fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Block scale and min (both >= 0; ``x ~ s * L - m``, ``L`` in 0..nmax) by ggml's
    ``make_qkx2_quants`` search: for each trial inverse scale ``(nmax + rmin + rdelta * k) / (max - min)``,
    the codes it gives, then the weighted least-squares scale and min for those codes (min <= 0 kept), the
    trial of least weighted error winning (the plain min / max range first). ``x``, ``w``: (S, B, n)."""
    mn = torch.clamp(x.amin(-1), max=0.0)
    rng = x.amax(-1) - mn
    safe = torch.where(rng > 0, rng, torch.ones_like(rng))
    best_s, best_min = rng / nmax, mn
    best_err = None
    sw = w.sum(-1)
    sx = (w * x).sum(-1)
    for k in [None] + list(range(nstep + 1)):
        if k is None:  # the min / max range as it is
            L = torch.clamp(torch.round((x - mn.unsqueeze(-1)) * (nmax / safe).unsqueeze(-1)), 0, nmax)
            s_k, min_k = best_s, mn
        else:
            iscale = (nmax + rmin + rdelta * k) / safe
            L = torch.clamp(torch.round((x - mn.unsqueeze(-1)) * iscale.unsqueeze(-1)), 0, nmax)
            sl, sl2, sxl = (w * L).sum(-1), (w * L * L).sum(-1), (w * L * x).sum(-1)
            D = sw * sl2 - sl * sl
            ok = D > 0
            Dsafe = torch.where(ok, D, torch.ones_like(D))
            s_k = (sw * sxl - sx * sl) / Dsafe
            min_k = (sl2 * sx - sl * sxl) / Dsafe
            pos = min_k > 0  # a min above 0: fit the scale alone with min 0
            s_k = torch.where(pos, sxl / torch.where(sl2 > 0, sl2, torch.ones_like(sl2)), s_k)
            min_k = torch.where(pos, torch.zeros_like(min_k), min_k)
            ok = ok & (s_k > 0)
        if best_err is None:
            best_err = (w * (s_k.unsqueeze(-1) * L + min_k.unsqueeze(-1) - x).pow(2)).sum(-1)
            sx2 = (w * x * x).sum(-1)
            continue
        # sum w (s L + min - x)^2 from the sums at hand (only the choice depends on it)
        err = sx2 + s_k * s_k * sl2 + min_k * min_k * sw + 2 * (s_k * min_k * sl - s_k * sxl - min_k * sx)
        better = ok & (err < best_err)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s_k, best_s)
        best_min = torch.where(better, min_k, best_min)
    flat = rng <= 0
    return torch.where(flat, torch.zeros_like(best_s), best_s), torch.where(flat, -mn, -best_min)


def _fit_scale_sym(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Signed block scale (``x ~ s * L``, ``L`` in -nmax..nmax-1) by ggml's ``make_qx_quants`` search
    (weights ``x^2``): trial inverse scales ``-(nmax + 0.1 k) / e``, ``e`` the signed extreme, ``k`` in
    -9..9, each with its least-squares scale ``sum(w L x) / sum(w L^2)``; the one of least weighted
    error wins (first ``e / -nmax`` itself). ``x``: (S, B, n)."""
    e = _signed_extreme(x)
    safe = torch.where(e != 0, e, torch.ones_like(e))
    w = x * x
    best = e / -nmax
    best_score = None
    for k in [None] + list(range(-9, 10)):
        iscale = -(nmax + (0.0 if k is None else 0.1 * k)) / safe
        L = torch.clamp(torch.round(x * iscale.unsqueeze(-1)), -nmax, nmax - 1)
        sxl, sl2 = (w * L * x).sum(-1), (w * L * L).sum(-1)
        ok = sl2 > 0
        score = torch.where(ok, sxl * sxl / torch.where(ok, sl2, torch.ones_like(sl2)), torch.zeros_like(sl2))
        s_k = sxl / torch.where(ok, sl2, torch.ones_like(sl2))
        if best_score is None:
            best_score, best = score, torch.where(ok, s_k, best)
            continue
        better = ok & (score > best_score)
        best_score = torch.where(better, score, best_score)
        best = torch.where(better, s_k, best)
    return torch.where(e != 0, best, torch.zeros_like(best))


#: ggml's ``make_qkx2_quants`` arguments per type with a min: (rmin, rdelta, nstep, weights)
_QKX2 = {"Q2_K": (-0.5, 0.1, 15, "abs"), "Q4_K": (-1.0, 0.1, 20, "rms"), "Q5_K": (-0.5, 0.1, 15, "rms")}


def _kquant_scales(x: torch.Tensor, kq: KQuant) -> tuple[torch.Tensor, ...]:
    """The two levels of scales of ``x`` (S, B, block) by ggml's searches: ``d``, ``dmin`` (S,)
    float16-exact (``dmin`` 0 for Q3_K / Q6_K), ``sc``, ``m`` (S, B) integer block codes."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if kq.has_min:
        rmin, rdelta, nstep, wk = _QKX2[kq.ggml_name]
        w = x.abs()
        if wk == "rms":
            w = w + x.pow(2).mean(-1, keepdim=True).sqrt()
        s_b, m_b = _fit_scale_min(x, w, kq.qmax, rmin, rdelta, nstep)  # block scale and min, >= 0
        codes, supers = [], []
        for v in (s_b, m_b):
            vmax = v.amax(-1, keepdim=True)  # (S, 1)
            inv = torch.where(vmax > 0, kq.scale_max / vmax, zero)
            codes.append(torch.clamp(torch.round(inv * v), 0, kq.scale_max))
            supers.append(_fp16(vmax / kq.scale_max).squeeze(-1))
        return supers[0], supers[1], codes[0], codes[1]
    s_b = _fit_scale_sym(x, -kq.qmin)  # (S, B), signed
    smax = _signed_extreme(s_b).unsqueeze(-1)  # (S, 1), signed
    inv = torch.where(smax != 0, -kq.scale_max / smax, zero)
    sc = torch.clamp(torch.round(inv * s_b), -kq.scale_max, kq.scale_max - 1)
    d = _fp16(torch.where(smax != 0, smax / -kq.scale_max, zero)).squeeze(-1)
    return d, torch.zeros_like(d), sc, torch.zeros_like(sc)


def _kquant_codes(x: torch.Tensor, kq: KQuant, d, dmin, sc, m) -> dict[str, Any]:
    """The weight codes of ``x`` (S, B, block) against the quantized block scales ``d * sc`` and
    mins ``dmin * m``: ``q = clamp(round((x + dmin m) / (d sc)), qmin, qmax)`` (0 where ``d sc = 0``)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    d1 = d.unsqueeze(-1) * sc  # (S, B), exact
    m1 = dmin.unsqueeze(-1) * m
    v = (x + m1.unsqueeze(-1)) / d1.unsqueeze(-1) if kq.has_min else x / d1.unsqueeze(-1)
    v = torch.where((d1 != 0).unsqueeze(-1).expand_as(x), v, zero)
    r = torch.round(v)
    q = torch.clamp(r, kq.qmin, kq.qmax)
    inside = (r == q) | ~torch.isfinite(r)
    return {"type": kq.ggml_name, "d": d, "dmin": dmin, "sc": sc, "m": m, "q": q, "inside": inside}


# ---------------------------------------------------------------------------------- learned scales
#: A learned super-block (or fallback block) scale is ``ref * c / SUPER_UNIT``: ``c`` starts at
#: SUPER_UNIT (a power of two, so the start is exactly ``ref``); one unit is 1/64 of the searched
#: scale, about what one block code is to a block scale (so one learning rate suits both levels).
SUPER_UNIT = 64.0


def _layout(w_shape: tuple[int, ...], fmt: str) -> tuple[KQuant, str, int, int]:
    """``(kq, ggml type, S, B)``: super-blocks (or fallback blocks) ``S`` and blocks ``B`` of each."""
    kq = _kq(fmt)
    qtype = gguf_type_of(fmt, w_shape[-1])
    n = int(np.prod(w_shape))
    if qtype != kq.ggml_name:
        return kq, qtype, n // QK, 0
    return kq, qtype, n // QK_K, QK_K // kq.block


def kquant_learned_shapes(shape: tuple[int, ...], fmt: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the learned state of a k-quant ``fmt`` weight of ``shape`` (see
    :func:`kquant_learned_init`): ``ref`` and ``super`` (S, n), ``block`` (S, B, n) (``(0,)`` for
    a fallback type, which has one level).

    Example::

        >>> kquant_learned_shapes((8, 512), "q4_k"), kquant_learned_shapes((8, 384), "q4_k")["super"]
        ({'ref': (16, 2), 'super': (16, 2), 'block': (16, 8, 2)}, (96, 1))
    """
    kq, qtype, S, B = _layout(tuple(shape), fmt)
    if B == 0:
        n = 2 if qtype == "Q5_1" else 1
        return {"ref": (S, n), "super": (S, n), "block": (0,)}
    n = 2 if kq.has_min else 1
    return {"ref": (S, n), "super": (S, n), "block": (S, B, n)}


@torch.no_grad()
def kquant_learned_init(w: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The learned state of a k-quant weight, started where the searches of :func:`kquant_parts`
    land (so the first forward pass equals the straight-through quantizer's, bit for bit):

    * ``ref`` (S, n), a buffer: the searched float16 ``d`` (and ``dmin``; a fallback type's block
      ``d``, and Q5_1's min ``m``).
    * ``super`` (S, n), learned: the super-block scale is ``fp16(ref * super / SUPER_UNIT)``
      (start: ``SUPER_UNIT``); Q5_1's min is ``fp16(m + d_ref * super[:, 1])`` (start: 0).
    * ``block`` (S, B, n), learned (k-quants only): the block scale and min as real numbers in
      units of the searched ``d`` / ``dmin`` (start: the searched codes ``sc``, ``m``); the
      forward pass rounds them to codes against the learned, float16 super-block scale.

    Example::

        >>> st = kquant_learned_init(torch.randn(2, 256), "q4_k")
        >>> {k: tuple(v.shape) for k, v in st.items()}, bool((st["super"] == SUPER_UNIT).all())
        ({'ref': (2, 2), 'super': (2, 2), 'block': (2, 8, 2)}, True)
    """
    kq, qtype, S, B = _layout(tuple(w.shape), fmt)
    if B == 0:
        x = w.detach().float().reshape(-1, QK)
        d, m = _fallback_fit(x, qtype)
        ref = torch.stack([d, m], -1) if qtype == "Q5_1" else d.unsqueeze(-1)
        sup = torch.full_like(ref, SUPER_UNIT)
        if qtype == "Q5_1":
            sup[:, 1] = 0.0
        return {"ref": ref, "super": sup, "block": torch.zeros(0, device=w.device)}
    d, dmin, sc, m = _kquant_scales(w.detach().float().reshape(S, B, kq.block), kq)
    if kq.has_min:
        return {"ref": torch.stack([d, dmin], -1), "super": torch.full((S, 2), SUPER_UNIT, device=w.device),
                "block": torch.stack([sc, m], -1)}
    return {"ref": d.unsqueeze(-1), "super": torch.full((S, 1), SUPER_UNIT, device=w.device), "block": sc.unsqueeze(-1)}


def _ste(v: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``exact``'s value with ``v``'s gradient (a straight-through rounding)."""
    return v + (exact - v).detach()


def _lsq_code(v: torch.Tensor, code: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """The code's value with LSQ's gradient: ``dcode/dv = 1`` where ``v`` rounded inside the code
    range, 0 where clamped (so ``d(s * code)/ds = code - v`` inside, ``code`` outside)."""
    return torch.where(inside, code + (v - v.detach()), code)


def _learned_parts(x: torch.Tensor, fmt: str, learned: Mapping[str, torch.Tensor], with_grad: bool):
    """The parts of ``x`` against the learned scales, and, ``with_grad``, the differentiable
    dequantized weight whose value is ignored (only its gradient is used)."""
    kq, qtype, S, B = _layout(tuple(x.shape), fmt)
    ref, sup = learned["ref"].float(), learned["super"].float()
    if B == 0:  # one level: the block's float16 d (and Q5_1's m)
        xb = x.float().reshape(S, QK)
        d_val = ref[:, 0] * sup[:, 0] / SUPER_UNIT
        m_val = ref[:, 1] + ref[:, 0] * sup[:, 1] if qtype == "Q5_1" else torch.zeros_like(d_val)
        d, m = _fp16(d_val.detach()), _fp16(m_val.detach())
        parts = _fallback_codes(xb.detach(), qtype, d, m)
        if not with_grad:
            return parts, None
        d_s, m_s = _ste(d_val, d).unsqueeze(-1), _ste(m_val, m).unsqueeze(-1)
        ok = (d != 0).unsqueeze(-1)
        v = (xb - m_s) / torch.where(ok, d_s, torch.ones_like(d_s))
        q_s = _lsq_code(v, parts["q"], parts["inside"] & ok)
        return parts, d_s * q_s + m_s
    n = ref.shape[1]
    xb = x.float().reshape(S, B, kq.block)
    sup_val = ref * sup / SUPER_UNIT  # (S, n): d (and dmin) before float16
    sup_q = _fp16(sup_val.detach())
    blk_val = ref.unsqueeze(1) * learned["block"].float()  # (S, B, n): block scale (and min), real
    ok2 = (sup_q != 0).unsqueeze(1).expand_as(blk_val)
    v2 = blk_val / torch.where(ok2, sup_q.unsqueeze(1), torch.ones_like(blk_val))
    r2 = torch.round(v2.detach())
    lo, hi = (0, kq.scale_max) if kq.has_min else (-kq.scale_max, kq.scale_max - 1)
    codes = torch.where(ok2, torch.clamp(r2, lo, hi), torch.zeros_like(r2))
    inside2 = ok2 & (r2 == codes)
    d = sup_q[:, 0]
    dmin = sup_q[:, 1] if n == 2 else torch.zeros_like(d)
    sc = codes[..., 0]
    m = codes[..., 1] if n == 2 else torch.zeros_like(sc)
    parts = _kquant_codes(xb.detach(), kq, d, dmin, sc, m)
    if not with_grad:
        return parts, None
    sup_s = _ste(sup_val, sup_q)  # (S, n)
    v2 = blk_val / torch.where(ok2, sup_s.unsqueeze(1), torch.ones_like(blk_val))
    blk_s = sup_s.unsqueeze(1) * _lsq_code(v2, codes, inside2)  # (S, B, n): d * sc (and dmin * m)
    s_s = blk_s[..., 0].unsqueeze(-1)  # (S, B, 1)
    m_s = blk_s[..., 1].unsqueeze(-1) if n == 2 else torch.zeros_like(s_s)
    ok = ((d.unsqueeze(-1) * sc) != 0).unsqueeze(-1)
    v = (xb + m_s) / torch.where(ok, s_s, torch.ones_like(s_s))
    q_s = _lsq_code(v, parts["q"], parts["inside"] & ok)
    return parts, s_s * q_s - m_s


@torch.no_grad()
def kquant_parts(w: torch.Tensor, fmt: str, learned: Optional[Mapping[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
    """The codes and scales of ``w`` (float, rows a multiple of 256) as k-quant ``fmt``; rows of a
    multiple of 32 only get the :data:`FALLBACK` type's (``type`` says which, by ggml name).

    Args:
        w: the weight.
        fmt: ``"q2_k"`` .. ``"q6_k"``.
        learned: the learned scales (:func:`kquant_learned_init`, trained); default: both levels
            of scales searched from ``w`` as ggml does.

    Returns a dict of float32 tensors, ``S`` the super-blocks (``w.numel() / 256``) and ``B`` the
    blocks of one: ``d`` (S,) float16-exact, ``dmin`` (S,) (zeros for Q3_K / Q6_K), ``sc`` and
    ``m`` (S, B) integer block codes, ``q`` (S, B, block) integer weight codes, and ``inside``
    (S, B, block) bool: the unclamped code lay in ``[qmin, qmax]`` (the STE mask).

    Example::

        >>> p = kquant_parts(torch.linspace(-1, 1, 256).reshape(1, 256), "q4_k")
        >>> p["q"].shape, int(p["q"].max()), int(p["sc"].max()), int(p["m"].max())
        (torch.Size([1, 8, 32]), 15, 63, 63)
    """
    if learned is not None:
        return _learned_parts(w.detach(), fmt, learned, with_grad=False)[0]
    kq, qtype, S, B = _layout(tuple(w.shape), fmt)
    if B == 0:
        x = w.detach().float().reshape(-1, QK)
        return _fallback_codes(x, qtype, *_fallback_fit(x, qtype))
    x = w.detach().float().reshape(S, B, kq.block)  # (S, B, block)
    return _kquant_codes(x, kq, *_kquant_scales(x, kq))


def kquant_dequantize(parts: Mapping[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """``(d*sc)*q - dmin*m`` in float32, as gguf-py and llama.cpp compute it, reshaped to ``shape``
    (a fallback type: ``d*q``, plus ``m`` for Q5_1).

    Example::

        >>> w = torch.randn(2, 512)
        >>> y = kquant_dequantize(kquant_parts(w, "q6_k"), w.shape)
        >>> bool((y - w).abs().max() < 0.1)
        True
    """
    if parts["type"] in FALLBACK.values():
        y = parts["d"].unsqueeze(-1) * parts["q"]
        if parts["type"] == "Q5_1":
            y = y + parts["m"].unsqueeze(-1)
        return y.reshape(shape)
    d1 = (parts["d"].unsqueeze(-1) * parts["sc"]).unsqueeze(-1)  # (S, B, 1)
    m1 = (parts["dmin"].unsqueeze(-1) * parts["m"]).unsqueeze(-1)
    return (d1 * parts["q"] - m1).reshape(shape)


class _KQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt):
        parts = kquant_parts(x, fmt)
        ctx.save_for_backward(parts["inside"])
        return kquant_dequantize(parts, x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside.reshape(grad.shape).to(grad.dtype), None


def fake_quantize_kquant(x: torch.Tensor, fmt: str, learned: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
    """Fake-quantize ``x`` (last axis a multiple of 256) as llama.cpp k-quant ``fmt``
    (``"q2_k"`` ... ``"q6_k"``).

    Without ``learned``, both levels of scales are searched from ``x`` (:func:`kquant_parts`) and
    the gradient is the clipped straight-through estimate (zero where a weight's code was clamped):
    what ``FakeQuantizer`` runs for a spec with a k-quant ``format`` and ``estimator: ste``.

    With ``learned`` (:func:`kquant_learned_init`, the state of ``estimator: lsq``), the scales
    come from it, quantized inside the forward pass exactly as the file stores them (the
    super-block scale to float16, the block scale and min to their integer codes against it), and
    the gradient reaches them through both levels, LSQ-style (``docs/math.md``, section 12): to
    ``x`` the clipped straight-through estimate; to the block scale ``s_b = d sc_b``,
    ``q - v`` where the weight's code ``q`` was not clamped and ``q`` where it was (``v`` the
    unrounded code); to the block min, 0 and ``-1``; then, through ``sc_b = round(s_b / d)``,
    straight through to the learned block value and LSQ's ``sc_b - s_b / d`` to ``d`` (float16
    rounding straight through). The value is the exact dequantization of those codes, bit for bit.

    Example::

        >>> x = torch.randn(4, 256, requires_grad=True)
        >>> y = fake_quantize_kquant(x, "q4_k")
        >>> y.sum().backward()
        >>> y.shape, len(torch.unique(y[0, :32])) <= 16, bool(x.grad.sum() > 200)
        (torch.Size([4, 256]), True, True)
        >>> st = {k: v.requires_grad_(k != "ref") for k, v in kquant_learned_init(x, "q4_k").items()}
        >>> y2 = fake_quantize_kquant(x, "q4_k", st)
        >>> y2.pow(2).sum().backward()
        >>> bool(torch.equal(y2, y)), st["block"].grad.shape, bool(st["super"].grad.abs().sum() > 0)
        (True, torch.Size([4, 8, 2]), True)
    """
    if learned is None:
        return _KQuantSTE.apply(x, fmt)
    parts, y_s = _learned_parts(x, fmt, learned, with_grad=True)
    y = kquant_dequantize(parts, x.shape)
    # the exact value, with the surrogate's gradient (y_s - y_s.detach() is exactly 0)
    return (y + (y_s - y_s.detach()).reshape(x.shape)).to(x.dtype)


# ---------------------------------------------------------------------------------- block bytes
def _bits(v: torch.Tensor, width: int) -> torch.Tensor:
    """Pack along axis -2: ``sum_j v[..., j, :] << (width * j)`` as uint8."""
    out = torch.zeros(v.shape[:-2] + v.shape[-1:], dtype=torch.int64)
    for j in range(v.shape[-2]):
        out |= v[..., j, :] << (width * j)
    return out


def _half_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(t.numpy().astype(np.float16).view(np.uint8).reshape(-1, 2).astype(np.int64))


def _pack_fallback(parts: Mapping[str, Any]) -> torch.Tensor:
    """(S, bytes_per_block) int64 byte values of Q8_0 / Q5_0 / Q5_1 / Q4_0 blocks."""
    name = parts["type"]
    d = _half_bytes(parts["d"].cpu())
    if name == "Q8_0":
        return torch.cat([d, parts["q"].cpu().long() & 0xFF], 1)
    if name == "Q4_0":  # d, then byte j: code j + 8 in the low nibble, code j + 16 + 8 in the high one
        u = parts["q"].cpu().long() + 8
        return torch.cat([d, u[:, :16] | (u[:, 16:] << 4)], 1)
    u = parts["q"].cpu().long() + (16 if name == "Q5_0" else 0)  # 0..31
    qh = _bits((u >> 4).reshape(-1, 32, 1), 1).reshape(-1)  # (S,) bit j = code j's fifth bit
    qh = torch.stack([(qh >> (8 * i)) & 0xFF for i in range(4)], 1)  # little-endian uint32
    qs = (u[:, :16] & 15) | ((u[:, 16:] & 15) << 4)
    if name == "Q5_0":
        return torch.cat([d, qh, qs], 1)
    return torch.cat([d, _half_bytes(parts["m"].cpu()), qh, qs], 1)


def _pack(parts: Mapping[str, Any], kq: KQuant) -> torch.Tensor:
    """(S, bytes_per_block) int64 byte values, in ggml's block layout."""
    if parts["type"] != kq.ggml_name:
        return _pack_fallback(parts)
    q = parts["q"].cpu().long().reshape(-1, QK_K)  # (S, 256)
    S = q.shape[0]
    sc = parts["sc"].cpu().long()
    m = parts["m"].cpu().long()
    d = _half_bytes(parts["d"].cpu())
    dmin = _half_bytes(parts["dmin"].cpu())
    name = kq.ggml_name
    if name == "Q2_K":  # scales[16] qs[64] d dmin
        scales = sc | (m << 4)
        qs = _bits(q.reshape(S, 2, 4, 32), 2).reshape(S, 64)
        return torch.cat([scales, qs, d, dmin], 1)
    if name == "Q3_K":  # hmask[32] qs[64] scales[12] d
        u = q + 4
        hmask = _bits((u >> 2).reshape(S, 8, 32), 1)
        qs = _bits((u & 3).reshape(S, 2, 4, 32), 2).reshape(S, 64)
        s6 = sc + 32
        low = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
        high = _bits(((s6 >> 4) & 3).reshape(S, 4, 4), 2)
        return torch.cat([hmask, qs, low, high, d], 1)
    if name in ("Q4_K", "Q5_K"):  # d dmin scales[12] (qh[32]) qs[128]
        scales = torch.cat([
            sc[:, :4] | ((sc[:, 4:] >> 4) << 6),
            m[:, :4] | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4),
        ], 1)
        qs = _bits((q & 15).reshape(S, 4, 2, 32), 4).reshape(S, 128)
        if name == "Q4_K":
            return torch.cat([d, dmin, scales, qs], 1)
        qh = _bits((q >> 4).reshape(S, 8, 32), 1)
        return torch.cat([d, dmin, scales, qh, qs], 1)
    # Q6_K: ql[128] qh[64] scales[16] (int8) d
    u = q + 32
    ql = _bits((u & 15).reshape(S, 2, 2, 64), 4).reshape(S, 128)
    qh = _bits((u >> 4).reshape(S, 2, 4, 32), 2).reshape(S, 64)
    return torch.cat([ql, qh, sc & 0xFF, d], 1)


def kquant_blocks(w: torch.Tensor, fmt: str, learned: Optional[Mapping[str, torch.Tensor]] = None) -> np.ndarray:
    """``w`` (rows, K), K a multiple of 256, as GGUF k-quant block bytes: a uint8 array
    (rows, K / 256 * bytes_per_block) (K a multiple of 32 only: the blocks of the type
    :func:`gguf_type_of` names) holding the codes and scales :func:`fake_quantize_kquant`
    uses (with the same ``learned`` scales, if any: they are written, not searched again), so
    ``gguf.quants.dequantize(blocks, type)`` equals the fake-quantized ``w`` bit for bit.

    Example::

        >>> import gguf
        >>> w = torch.randn(3, 512)
        >>> b = kquant_blocks(w, "q5_k")
        >>> b.shape, bool((gguf.quants.dequantize(b, gguf.GGMLQuantizationType.Q5_K)
        ...                == fake_quantize_kquant(w, "q5_k").numpy()).all())
        ((3, 352), True)
    """
    kq = _kq(fmt)
    if w.dim() != 2:
        raise QATConfigError(f"{kq.ggml_name} blocks are written for 2-D weights (rows, K), got shape {tuple(w.shape)}")
    rows = w.shape[0]
    b = _pack(kquant_parts(w, fmt, learned), kq)  # (S, bytes)
    return np.ascontiguousarray(b.to(torch.uint8).numpy().reshape(rows, -1))


# ---------------------------------------------------------------------------------- mixes
#: The mixes :func:`kquant_mix_plan` knows: the base type, and the type of the tensors that get more bits.
KQUANT_MIXES = {"q4_k_m": ("q4_k", "q6_k"), "q5_k_m": ("q5_k", "q6_k")}

# llama.cpp's tensor roles by module name: (role, HF BERT suffix, HF Llama suffix)
_ROLES = (
    ("attn_v", ("attention.self.value",), ("self_attn.v_proj",)),
    ("ffn_down", ("output.dense",), ("mlp.down_proj",)),
    ("output", (), ("lm_head",)),
)


def _use_more_bits(i: int, n: int) -> bool:
    # llama.cpp (llama-quant.cpp): the first and last eighth of the layers, and every third between
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def _layer_index(name: str) -> tuple:
    import re

    hit = re.search(r"(?:^|\.)(?:layer|layers|h|blocks)\.(\d+)\.", name)
    return (int(hit.group(1)),) if hit else ()


def _weight_spec(fmt: str) -> dict[str, Any]:
    kq = KQUANTS[fmt]
    return {"bits": kq.bits, "signed": kq.signed, "symmetric": kq.signed, "granularity": "per_group",
            "group_size": QK, "scale_dtype": "float16", "round_mode": "half_even", "format": fmt}


#: The inputs of the presets' layers: llama.cpp's CPU matmul quantizes activations to 8 bits a block
#: (Q8_K, 256 elements and a float32 scale, for k-quant weights; Q8_0 / Q8_1, 32 elements and a
#: float16 scale, for the fallback types); one spec for both: dynamic Q8_0 blocks of 32
Q8_INPUT = {"bits": 8, "signed": True, "symmetric": True, "narrow_range": True, "granularity": "per_group",
            "group_size": QK, "dynamic": True, "round_mode": "half_away", "scale_dtype": "float16"}


def kquant_mix_plan(model: torch.nn.Module, mix: str, inputs: bool = True):
    """llama.cpp's ``Q4_K_M`` / ``Q5_K_M`` assignment for ``model`` as a :class:`qat.QuantPlan`.

    As ``llama-quantize`` assigns them (``llama_tensor_get_type``): every Linear weight (and the token
    embedding) gets the base type (Q4_K / Q5_K); ``attn_v`` and ``ffn_down`` get Q6_K in the layers
    where llama.cpp's ``use_more_bits(i, n_layer)`` holds (the first and last eighth, and every third
    layer between), and the output head (``lm_head``) gets Q6_K; a model without one (BERT) has its
    token embedding treated as the output, Q6_K. Roles are read from Hugging Face
    module names: BERT (``attention.self.value``, ``output.dense`` of a layer) and Llama
    (``self_attn.v_proj``, ``mlp.down_proj``, ``lm_head``). Inputs are quantized as llama.cpp's CPU
    matmul does for these weights (dynamic 8-bit blocks, :data:`Q8_INPUT`) unless ``inputs=False``.

    Raises:
        QATConfigError: an unknown ``mix``, naming the valid ones.

    Example::

        >>> import torch.nn as nn
        >>> layer = lambda: nn.ModuleDict({"self_attn": nn.ModuleDict({"v_proj": nn.Linear(256, 256)}),
        ...                                "mlp": nn.ModuleDict({"down_proj": nn.Linear(256, 256)})})
        >>> model = nn.ModuleDict({"layers": nn.ModuleList([layer() for _ in range(8)])})
        >>> plan = kquant_mix_plan(model, "q4_k_m")
        >>> got = {n: lq.weight.format.value for n, lq in plan.resolve(model).items()}
        >>> [got[f"layers.{i}.self_attn.v_proj"] for i in range(8)]
        ['q6_k', 'q4_k', 'q4_k', 'q6_k', 'q4_k', 'q4_k', 'q6_k', 'q6_k']
    """
    from .plan import QuantPlan  # the plan owner; imported here (plan -> modules -> fake_quant -> kquants)

    if mix not in KQUANT_MIXES:
        raise QATConfigError(f"kquant_mix_plan(mix={mix!r}): valid mixes are {sorted(KQUANT_MIXES)}")
    base, more = KQUANT_MIXES[mix]
    names = [n for n, mod in model.named_modules() if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding))]
    n_layer = 1 + max([_layer_index(n)[0] for n in names if _layer_index(n)], default=-1)
    rules: list[dict[str, Any]] = [{"match": "*", "types": ["Linear"], "weight": _weight_spec(base),
                                    "input": dict(Q8_INPUT) if inputs else False}]
    emb = [n for n in names if n.endswith(("word_embeddings", "embed_tokens"))]
    # llama.cpp: a model without an output head (BERT) has its token embedding quantized as the output
    has_output = any(n.endswith(_ROLES[-1][2]) for n in names)
    for n in emb:
        rules.append({"match": n, "types": ["Embedding"], "weight": _weight_spec(base if has_output else more)})
    for n in names:
        idx = _layer_index(n)
        for role, bert, llama in _ROLES:
            if not n.endswith(bert + llama):
                continue
            if role == "ffn_down" and n.endswith(bert) and ".attention." in n:
                continue  # BERT's attention.output.dense is attn_output, not ffn_down
            if role == "output" or (idx and _use_more_bits(idx[0], n_layer)):
                rules.append({"match": n, "types": ["Linear"], "weight": {"format": more, "bits": KQUANTS[more].bits,
                                                                           "signed": True, "symmetric": True}})
    return QuantPlan.from_dict({"name": f"gguf_{mix}", "rules": rules})
