"""``microscaling.cu`` against the reference (qat/microscaling.py, run on the CPU), on the GPU: the
float formats MXFP4, MXFP8, NVFP4 and FP8 per tensor / per channel, forward values and packed masks,
the straight-through backward and the learned-scale backward (``dx``) bit for bit in every dtype;
the learned scale's gradient (a float atomic sum, in another order) within 1e-5 of the sum of the
magnitudes of its terms. Inputs span many binades, with NaN, infinities, zero blocks and values on
rounding ties.
"""

import zlib

import pytest
import torch

from qat.kernels import cupy_backend, fake_quantize_float, fake_quantize_float_lsq, reference
from qat.microscaling import MICRO_FORMATS, float_scale

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy"
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(4, 64), (3, 5, 96), (1, 32), (257, 160), (2, 4096)]


def _seed(*key) -> int:
    return zlib.crc32(repr(key).encode())


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (the sign of zero too), NaN where NaN (any payload)."""
    a, b = a.cpu().float(), b.cpu().float()
    na, nb = torch.isnan(a), torch.isnan(b)
    return torch.equal(na, nb) and torch.equal(a[~na].view(torch.int32), b[~nb].view(torch.int32))


def _x(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 10.0 ** torch.randint(-6, 6, shape, generator=g).float()
    flat = x.view(-1)
    n = flat.numel()
    # values on E2M1 / E4M3 rounding ties at unit scale, zeros, a zero block, NaN and infinities
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 17.0, 0.5625, -2.5, -5.0])
    k = min(n // 4, ties.numel())
    flat[:k] = ties[:k]
    if n >= 64:
        flat[32:48] = 0.0
        flat[n // 2] = float("nan")
        flat[n // 3] = float("inf")
        flat[n // 5] = -float("inf")
    return x.to(dtype)


def _args(fmt, x, axis):
    f = MICRO_FORMATS[fmt]
    if f.block_scale == "e8m0":
        return f.element, f.block_size, f.block_scale, None, None
    ax = axis if f.block_size == 0 else None
    return f.element, f.block_size, f.block_scale, float_scale(x.float(), fmt, ax), ax


def _cases():
    for fmt in sorted(MICRO_FORMATS):
        axes = [None, 0, -1] if MICRO_FORMATS[fmt].block_size == 0 else [None]
        for axis in axes:
            yield fmt, axis


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,axis", list(_cases()))
def test_forward_and_ste_backward_bit_exact(fmt, axis, shape, dtype):
    x = _x(shape, dtype, seed=_seed(fmt, axis, shape))
    element, bs, kind, scale, ax = _args(fmt, x, axis)
    y_ref, m_ref = reference.microscaling_forward(x, element, bs, kind, scale, ax)
    xd = x.cuda()
    sd = None if scale is None else scale.cuda()
    y, m = cupy_backend.microscaling_forward(xd, element, bs, kind, sd, ax)
    assert y.dtype == dtype and _bits_equal(y, y_ref)
    assert torch.equal(m.cpu(), m_ref)
    # the public op end to end: STE backward through the saved mask
    xg = xd.clone().requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    fake_quantize_float(xg, element, bs, kind, sd, ax).backward(g.cuda())
    want = reference.fake_quantize_backward(g, m_ref)
    assert torch.equal(xg.grad.cpu(), want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt,axis", [(f, a) for f, a in _cases() if MICRO_FORMATS[f].learnable])
def test_learned_scale_backward(fmt, axis, shape, dtype):
    x = _x(shape, dtype, seed=_seed(fmt, axis, shape, 1))
    element, bs, kind, scale, ax = _args(fmt, x, axis)
    scale = scale * 0.6  # some elements (FP8) / block codes (NVFP4) saturate
    g = torch.randn(shape).to(dtype)
    dx_ref, ds_ref = reference.microscaling_lsq_backward(g, x, element, bs, kind, scale, ax, 0.125)
    dx, ds = cupy_backend.microscaling_lsq_backward(g.cuda(), x.cuda(), element, bs, kind, scale.cuda(), ax, 0.125)
    assert torch.equal(dx.cpu(), dx_ref)
    # bound: 1e-5 of a bound on the sum of |terms| of a scale, |g| * c * |q - v| <= |g| * max * max code
    f = MICRO_FORMATS[fmt]
    cmax = 448.0 if kind == "e4m3" else 1.0
    per = g.float().abs().sum() if ax is None else g.float().abs().movedim(ax, 0).reshape(x.shape[ax], -1).sum(1)
    bound = 1e-5 * 0.125 * per.reshape(ds_ref.shape) * f.elem.max * cmax
    assert ds.shape == ds_ref.shape and ((ds.cpu() - ds_ref).abs() <= bound).all()
    # the op end to end
    s = scale.cuda().requires_grad_()
    xg = x.cuda().requires_grad_()
    y = fake_quantize_float_lsq(xg, s, element, bs, kind, ax, 0.125)
    y_ref, _ = reference.microscaling_forward(x, element, bs, kind, scale, ax)
    assert _bits_equal(y.detach(), y_ref)
    y.backward(g.cuda())
    assert torch.equal(xg.grad.cpu(), dx_ref)


def test_large_tensor_many_warps():
    """A tensor past one wave of blocks (the grid-stride loop), per-channel FP8 on a middle axis."""
    x = torch.randn(64, 33, 512) * 3
    s = float_scale(x, "fp8_e4m3", 1)
    y_ref, m_ref = reference.microscaling_forward(x, "e4m3", 0, "none", s, 1)
    y, m = cupy_backend.microscaling_forward(x.cuda(), "e4m3", 0, "none", s.cuda(), 1)
    assert _bits_equal(y, y_ref) and torch.equal(m.cpu(), m_ref)
    y_ref, m_ref = reference.microscaling_forward(x, "e2m1", 32, "e8m0")
    y, m = cupy_backend.microscaling_forward(x.cuda(), "e2m1", 32, "e8m0")
    assert _bits_equal(y, y_ref) and torch.equal(m.cpu(), m_ref)
