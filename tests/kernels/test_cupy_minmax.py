"""The fused range-of-the-data kernel (rows.cu) against the reference, on the GPU, bit for bit.

The reference runs on the same GPU: the scale of ``qparams_from_range`` divides by a Python number,
which PyTorch's CUDA kernels do as a multiplication by the float32 reciprocal (the CPU divides), and
the kernel follows the device's PyTorch. Outputs, masks and the observer state are compared with
``torch.equal`` in every dtype.
"""

import pytest
import torch

from qat.kernels import cupy_backend, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy"
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (qmin, qmax, symmetric): int8 asymmetric unsigned (per-token activations), int4 / int8 symmetric
# signed (weights), int4 symmetric unsigned, int3 asymmetric signed
SCHEMES = [(0, 255, False), (-8, 7, True), (-128, 127, True), (0, 15, True), (-4, 3, False)]


def _x(shape, dtype, gen, nonfinite=False):
    x = torch.randn(shape, generator=gen) * torch.rand(shape[:-1] + (1,), generator=gen) * 4
    if nonfinite:
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 50),), generator=gen)
        vals = torch.tensor([float("nan"), float("inf"), float("-inf")])[torch.randint(0, 3, idx.shape, generator=gen)]
        flat[idx] = vals
        x.view(-1, shape[-1])[0] = float("nan")  # a row with no finite value
    return x.to(dtype).cuda()


def _check(x, row, qmin, qmax, sym, f16, rm, with_state, gen):
    nrows = x.numel() // row

    def state():
        torch.manual_seed(1)
        mn = -torch.rand(nrows) - 0.1
        return (mn.cuda(), (torch.rand(nrows) + 0.1).cuda(), (torch.rand(nrows) < 0.5).cuda(),
                torch.ones(nrows).cuda(), torch.zeros(nrows).cuda())  # fmt: skip

    s_ker = state() if with_state else None
    s_ref = state() if with_state else None
    y, m = cupy_backend.fake_quantize_minmax_forward(x, row, qmin, qmax, sym, f16, rm, s_ker)
    y_ref, m_ref = reference.fake_quantize_minmax_forward(x, row, qmin, qmax, sym, f16, rm, s_ref)
    torch.cuda.synchronize()
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.isnan(), y_ref.isnan())
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(y_ref)), (row, qmin, qmax, sym, f16, rm, x.dtype)
    assert torch.equal(m, m_ref)
    if with_state:
        for a, b in zip(s_ker, s_ref):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_per_token_rows(dtype, scheme):
    gen = torch.Generator().manual_seed(hash((str(dtype), scheme)) % 2**31)
    qmin, qmax, sym = scheme
    for shape in [(4, 7, 768), (3, 3072), (5, 32), (2, 64)]:
        x = _x(shape, dtype, gen)
        _check(x, shape[-1], qmin, qmax, sym, False, "half_even", False, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rm", ["half_even", "half_away", "half_up"])
@pytest.mark.parametrize("f16", [False, True])
def test_groups_with_state_nonfinite_and_modes(dtype, rm, f16):
    gen = torch.Generator().manual_seed(7)
    for qmin, qmax, sym in SCHEMES:
        for shape, row in [((64, 256), 128), ((48, 96), 32), ((16, 768), 768), ((33, 64), 64)]:
            x = _x(shape, dtype, gen, nonfinite=True)
            _check(x, row, qmin, qmax, sym, f16, rm, True, gen)
            _check(x, row, qmin, qmax, sym, f16, rm, False, gen)


def test_unaligned_and_fallback_rows_match():
    gen = torch.Generator().manual_seed(3)
    base = _x((8, 129), torch.float32, gen)
    x = base[:, 1:]  # a view one element in: scalar loads (vec 1)
    _check(x.contiguous()[:, :128].contiguous(), 32, -8, 7, True, False, "half_even", True, gen)
    xo = torch.empty(8 * 128 + 1, device="cuda")[1:].view(8, 128)
    xo.copy_(base[:, :128])
    _check(xo, 128, 0, 255, False, False, "half_even", True, gen)
    # rows the kernel does not take (not a multiple of 32; longer than 512 vectors): the reference range
    _check(_x((6, 48), torch.float32, gen), 48, -8, 7, True, False, "half_even", True, gen)
    _check(_x((2, 4096), torch.float32, gen), 4096, 0, 255, False, False, "half_even", True, gen)


def test_backward_is_the_mask():
    from qat.kernels import fake_quantize_minmax

    gen = torch.Generator().manual_seed(5)
    x = _x((4, 256), torch.bfloat16, gen).requires_grad_()
    y = fake_quantize_minmax(x, 128, -8, 7, True)
    g = torch.randn(x.shape, generator=gen).to(x.dtype).cuda()
    y.backward(g)
    _, m = reference.fake_quantize_minmax_forward(x.detach(), 128, -8, 7, True)
    keep = reference.unpack_mask(m, x.numel()).view(x.shape)
    assert torch.equal(x.grad, torch.where(keep, g, torch.zeros_like(g)))
