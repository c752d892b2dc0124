"""The kernels' ``out_dtype``: a forward that writes its result in another dtype (what a layer under
autocast asks for) equals the forward in x's dtype followed by ``.to(out_dtype)``, bit for bit, and
the STE backward that takes the gradient in that dtype and returns it in x's equals the cast followed
by the backward. On the GPU; pairs no kernel writes (an element wider than x's, float64) take the
cast after, and must answer the same."""

import zlib

import pytest
import torch

from qat.kernels import cupy_backend

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy"
    ),
]

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (x's dtype, out_dtype): the kernel pairs first, then two the backend casts after
PAIRS = [(F32, BF16), (F32, F16), (F16, BF16), (BF16, F16), (F32, F32), (BF16, F32), (F32, torch.float64)]
# (shape, axis, group_size): per tensor, per channel on axis 0 / the last axis / a middle axis, per group
CASES = [((3, 5), None, None), ((64, 768), None, 128), ((64, 768), 0, None), ((1000, 8), 1, None),
         ((4, 6, 37), 1, None), ((257, 1031), None, None), ((5, 130), None, 10)]  # fmt: skip


def _pid(p):
    return f"{str(p[0])[6:]}->{str(p[1])[6:]}"


def _cid(c):
    shape, axis, gs = c
    return "x".join(map(str, shape)) + (f"-g{gs}" if gs else (f"-a{axis}" if axis is not None else "-t"))


def _inputs(shape, dtype, pshape, seed, offset=0):
    gen = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    x = (torch.randn(n + offset, generator=gen) * 3).to(dtype).cuda()[offset:].reshape(shape)
    s = (torch.rand(pshape, generator=gen) * 0.3 + 0.01).cuda()
    z = torch.randint(-3, 4, pshape, generator=gen).float().cuda()
    return x, s, z, gen


def _pshape(shape, axis, gs):
    return (shape[axis],) if axis is not None else ((*shape[:-1], shape[-1] // gs) if gs else (1,))


def _same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.isnan(), b.isnan())


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("case", CASES, ids=_cid)
@pytest.mark.parametrize("pair", PAIRS, ids=_pid)
def test_forward_and_ste_backward_write_the_other_dtype(pair, case, offset):
    xd, od = pair
    shape, axis, gs = case
    x, s, z, gen = _inputs(shape, xd, _pshape(shape, axis, gs), zlib.crc32(repr((pair, case, offset)).encode()), offset)
    for qmin, qmax, mode in ((-8, 7, "half_even"), (0, 255, "half_away")):
        y, m = cupy_backend.fake_quantize_forward(x, s, z, qmin, qmax, axis, gs, mode, od)
        y0, m0 = cupy_backend.fake_quantize_forward(x, s, z, qmin, qmax, axis, gs, mode)
        _same(y, y0.to(od))
        assert torch.equal(m, m0)
        g = (torch.randn(shape, generator=gen) * 5).to(od).cuda() if od != torch.float64 else None
        if g is not None:
            _same(cupy_backend.fake_quantize_backward(g, m, xd), cupy_backend.fake_quantize_backward(g.to(xd), m))
        zl = z + 0.3  # LSQ: the zero point used rounded
        _same(cupy_backend.fake_quantize_lsq_forward(x, s, zl, qmin, qmax, axis, gs, mode, od),
              cupy_backend.fake_quantize_lsq_forward(x, s, zl, qmin, qmax, axis, gs, mode).to(od))  # fmt: skip
    alpha = torch.tensor([2.5], device="cuda")
    _same(cupy_backend.fake_quantize_pact_forward(x, alpha, 0, 15, "half_even", od),
          cupy_backend.fake_quantize_pact_forward(x, alpha, 0, 15, "half_even").to(od))  # fmt: skip


@pytest.mark.parametrize("row", [32, 128, 768, 3072, 48])
@pytest.mark.parametrize("pair", PAIRS, ids=_pid)
def test_range_of_the_data_forward_writes_the_other_dtype(pair, row):
    """rows.cu (the dynamic per-token input and the STE weight with its observer state); 3072 float32
    elements and rows of 48 take the unfused path."""
    xd, od = pair
    gen = torch.Generator().manual_seed(row)
    x = (torch.randn(64, row, generator=gen) * torch.rand(64, 1, generator=gen) * 4).to(xd).cuda()
    x[3, 5] = float("nan")
    for qmin, qmax, sym in ((0, 255, False), (-8, 7, True)):
        states = [
            tuple(t.cuda() for t in (-torch.rand(64), torch.rand(64), torch.rand(64) < 0.5, torch.ones(64), torch.zeros(64)))
            for _ in range(2)
        ]
        y, m = cupy_backend.fake_quantize_minmax_forward(x, row, qmin, qmax, sym, False, "half_even", states[0], od)
        y0, m0 = cupy_backend.fake_quantize_minmax_forward(x, row, qmin, qmax, sym, False, "half_even", states[1])
        _same(y, y0.to(od))
        assert torch.equal(m, m0)
        for a, b in zip(*states):
            assert torch.equal(a, b)
        y, _ = cupy_backend.fake_quantize_minmax_forward(x, row, qmin, qmax, sym, False, "half_up", None, od)
        y0, _ = cupy_backend.fake_quantize_minmax_forward(x, row, qmin, qmax, sym, False, "half_up")
        _same(y, y0.to(od))


def test_public_ops_gradient_comes_back_in_x_dtype():
    from qat.kernels import fake_quantize, fake_quantize_minmax

    x = torch.randn(16, 256, device="cuda", requires_grad=True)
    y = fake_quantize_minmax(x, 256, 0, 255, False, out_dtype=BF16)
    assert y.dtype == BF16
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == F32
    s = torch.full((1,), 0.05, device="cuda")
    y = fake_quantize(x, s, torch.zeros(1, device="cuda"), -8, 7, out_dtype=BF16)
    g = torch.randn(16, 256, device="cuda", dtype=BF16)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx0,) = torch.autograd.grad(fake_quantize(x, s, torch.zeros(1, device="cuda"), -8, 7), x, g.float())
    assert gx.dtype == F32 and torch.equal(gx, gx0) and 0 < int((gx == 0).sum()) < gx.numel()
