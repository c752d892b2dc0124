"""The CuPy kernels against the PyTorch reference (the oracle, run on the CPU), on the GPU.

float32 values, masks and dx are compared bit for bit; float16 / bfloat16 outputs within one
quantization step (they are computed in float32 the same way, so in practice they are equal too);
reduced gradients (LSQ dscale / dzero_point, PACT dalpha, whose summation order differs) within a
bound of 1e-5 of the sum of the magnitudes of their terms. Fresh random inputs for every case, with
part of the values on the rounding ties so the three rounding modes differ.
"""

import contextlib
import math
import zlib

import pytest
import torch

from qat.granularity import Layout
from qat.kernels import cupy_backend, reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy"
    ),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _qrange(bits, signed):
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _param_shape(shape, axis, group_size):
    if group_size is not None:
        return tuple(shape[:-1]) + (shape[-1] // group_size,)
    if axis is not None:
        return (shape[axis],)
    return (1,)


def _make(shape, dtype, bits, signed, axis, group_size, gen, asym=True):
    """x on the GPU (in ``dtype``) and float32 scale / zero point, with ties and clipped values."""
    qmin, qmax = _qrange(bits, signed)
    pshape = _param_shape(shape, axis, group_size)
    x = torch.randn(shape, generator=gen) * 2
    # power-of-two scales make x * inv_s exact, so values on the half grid are true ties
    scale = 2.0 ** torch.randint(-5, 1, pshape, generator=gen).float()
    scale = torch.where(torch.rand(pshape, generator=gen) < 0.5, scale, torch.rand(pshape, generator=gen) * 0.4 + 0.02)
    if asym:
        zp = torch.randint(qmin, qmax + 1, pshape, generator=gen).float()
    else:
        zp = torch.zeros(pshape)
    sb = reference.broadcast_param(scale, x, axis, group_size)
    if group_size is not None:
        xg = x.reshape(*shape[:-1], shape[-1] // group_size, group_size)
        ties = (torch.randint(qmin - 3, qmax + 3, xg.shape, generator=gen).float() + 0.5) * sb
        xg = torch.where(torch.rand(xg.shape, generator=gen) < 0.3, ties, xg)
        x = xg.reshape(shape)
    else:
        ties = (torch.randint(qmin - 3, qmax + 3, shape, generator=gen).float() + 0.5) * sb
        x = torch.where(torch.rand(shape, generator=gen) < 0.3, ties, x)
    return x.to(dtype).cuda(), scale.cuda(), zp.cuda(), qmin, qmax


def _step(scale, x, axis, group_size):
    """One quantization step broadcast to x's (flat) elements, float32 on the CPU."""
    s = reference.broadcast_param(scale.cpu(), x.cpu(), axis, group_size)
    if group_size is not None:
        return s.expand(*x.shape[:-1], x.shape[-1] // group_size, group_size).reshape(x.shape)
    return s.expand(x.shape)


def _assert_values(out, ref, scale, x, axis, group_size):
    out = out.cpu()
    assert out.dtype == ref.dtype and out.shape == ref.shape and out.is_contiguous()
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        step = _step(scale, x, axis, group_size)
        err = (out.float() - ref.float()).abs()
        assert bool((err <= step * 1.0001).all()), f"max error {err.max()} over one step"


def _per_param_abs_sum(t, x, axis, group_size):
    tg = t.abs().float()
    if group_size is not None:
        tg = tg.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    return Layout(axis=axis, group_size=group_size).sum_to_param(tg, x.float())


def _assert_reduced(out, ref, bound):
    out = out.cpu().float()
    ref = ref.float()
    assert out.shape == ref.shape
    err = (out - ref).abs()
    tol = 1e-5 * bound.reshape(ref.shape) + 1e-30
    assert bool((err <= tol).all()), f"max error {err.max()} (tolerance {tol.max()})"


# shapes x granularities, including odd sizes, one element, 0-d and channels on every axis
CASES = [
    ((), None, None),
    ((1,), None, None),
    ((1,), 0, None),
    ((7,), None, None),
    ((33,), 0, None),
    ((3, 5), 1, None),
    ((4, 96), 0, None),
    ((4, 96), None, 32),
    ((4, 96), None, 3),
    ((2, 3, 17), 1, None),
    ((2, 3, 17), None, 17),
    ((8, 16, 4, 4), 1, None),
    ((8, 16, 4, 4), 0, None),
    ((1000, 4), 1, None),
    ((1000, 6), 1, None),
    ((5, 130), None, 10),
    ((257, 1031), 0, None),
    ((257, 1031), 1, None),
    ((257, 1031), None, None),
    ((64, 2048), None, 128),
    ((64, 2048), None, 32),
    ((16, 384, 96), 2, None),
    ((16, 384, 96), 1, None),
    ((3, 40000), 0, None),
    # long contiguous runs (reduce.cu's rows kernels): rows not a multiple of the loads in flight,
    # several rows per key (a middle axis), an odd run length (scalar loads), per-group of 8192
    ((5, 16392), 0, None),
    ((2, 3, 8200), 1, None),
    ((3, 5, 4099), 1, None),
    ((4, 16384), None, 8192),
    ((1, 20000), 0, None),
]


@pytest.fixture(autouse=True)
def _poison_outputs():
    """Outputs of the reductions that store every key start as NaN here, so a key left unwritten fails."""
    with cupy_backend.use_tuning(poison_outputs=True):
        yield


@pytest.fixture
def tune():
    """``tune(**fields)``: the kernels' tuning (``KernelTuning`` fields) for the rest of the test, on top
    of the poisoned outputs."""
    with contextlib.ExitStack() as stack:
        yield lambda **fields: stack.enter_context(cupy_backend.use_tuning(**fields))


def _case_id(case):
    shape, axis, gs = case
    return f"{'x'.join(map(str, shape)) or 'scalar'}-" + (f"g{gs}" if gs else (f"a{axis}" if axis is not None else "t"))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fake_quantize_forward_backward(case, dtype):
    shape, axis, gs = case
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, axis, gs, dtype)).encode()))
    for bits, signed, mode in ((4, True, "half_even"), (8, False, "half_away"), (3, True, "half_up")):
        x, s, z, qmin, qmax = _make(shape, dtype, bits, signed, axis, gs, gen)
        y, m = cupy_backend.fake_quantize_forward(x, s, z, qmin, qmax, axis, gs, mode)
        y_ref, m_ref = reference.fake_quantize_forward(x.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs, mode)
        _assert_values(y, y_ref, s, x, axis, gs)
        torch.testing.assert_close(m.cpu(), m_ref, atol=0, rtol=0)
        grad = torch.randn(shape, generator=gen).to(dtype).cuda()
        dx = cupy_backend.fake_quantize_backward(grad, m)
        torch.testing.assert_close(dx.cpu(), reference.fake_quantize_backward(grad.cpu(), m_ref), atol=0, rtol=0)
        owned = grad.clone()
        assert cupy_backend.fake_quantize_backward_(owned, m) is owned
        assert torch.equal(owned, dx)


@pytest.mark.parametrize("n", [1, 31, 32, 33, 1000, 4097, 3 * 2**20 + 5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_in_place_backward_on_random_masks(n, dtype):
    """The in-place clipped STE against the out-of-place one on random masks (every bit pattern of a
    word, the last word's bits past n set or not)."""
    gen = torch.Generator().manual_seed(n)
    grad = torch.randn(n, generator=gen).to(dtype).cuda()
    words = torch.randint(-(2**31), 2**31 - 1, (reference.mask_words(n),), generator=gen, dtype=torch.int32)
    words[: len(words) // 2] = -1  # whole words kept, as dynamic per-token ranges give
    words = words.cuda()
    want = reference.fake_quantize_backward(grad.cpu(), words.cpu())
    got = grad.clone()
    cupy_backend.fake_quantize_backward_(got, words)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lsq_forward_backward(case, dtype):
    shape, axis, gs = case
    gen = torch.Generator().manual_seed(1 + zlib.crc32(repr((shape, axis, gs, dtype)).encode()))
    for bits, signed, mode, factor in ((4, True, "half_even", 1.0), (8, False, "half_up", 0.03125), (2, True, "half_away", 0.7)):
        x, s, z, qmin, qmax = _make(shape, dtype, bits, signed, axis, gs, gen)
        z = z + (torch.rand(z.shape, generator=gen).cuda() - 0.5) * 3  # a learned, non-integer zero point
        y = cupy_backend.fake_quantize_lsq_forward(x, s, z, qmin, qmax, axis, gs, mode)
        y_ref = reference.fake_quantize_lsq_forward(x.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs, mode)
        _assert_values(y, y_ref, s, x, axis, gs)
        grad = torch.randn(shape, generator=gen).to(dtype).cuda()
        dx, ds, dz = cupy_backend.fake_quantize_lsq_backward(grad, x, s, z, qmin, qmax, axis, gs, factor, mode)
        dx_ref, ds_ref, dz_ref = reference.fake_quantize_lsq_backward(
            grad.cpu(), x.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs, factor, mode
        )
        torch.testing.assert_close(dx.cpu(), dx_ref, atol=0, rtol=0)
        bound = _per_param_abs_sum(grad.cpu(), x.cpu(), axis, gs) * (qmax - qmin + 1) * abs(factor)
        _assert_reduced(ds, ds_ref, bound)
        _assert_reduced(dz, dz_ref, bound * s.cpu().abs().reshape(bound.shape))
        assert ds.shape == s.shape and dz.shape == z.shape and ds.dtype == torch.float32


@pytest.mark.parametrize("shape", [(), (1,), (31,), (257, 1031), (4, 3, 33, 33)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pact_forward_backward(shape, dtype):
    gen = torch.Generator().manual_seed(7 + len(shape))
    for qmin, qmax, mode in ((0, 15, "half_even"), (0, 255, "half_away"), (0, 3, "half_up")):
        x = (torch.randn(shape, generator=gen) * 2).to(dtype).cuda()
        alpha = (torch.rand(1, generator=gen) * 2 + 0.5).cuda()
        y = cupy_backend.fake_quantize_pact_forward(x, alpha, qmin, qmax, mode)
        y_ref = reference.fake_quantize_pact_forward(x.cpu(), alpha.cpu(), qmin, qmax, mode)
        if dtype == torch.float32:
            torch.testing.assert_close(y.cpu(), y_ref, atol=0, rtol=0)
        else:
            assert float((y.cpu().float() - y_ref.float()).abs().max()) <= float(alpha) / (qmax - qmin)
        grad = torch.randn(shape, generator=gen).to(dtype).cuda()
        dx, da = cupy_backend.fake_quantize_pact_backward(grad, x, alpha)
        dx_ref, da_ref = reference.fake_quantize_pact_backward(grad.cpu(), x.cpu(), alpha.cpu())
        torch.testing.assert_close(dx.cpu(), dx_ref, atol=0, rtol=0)
        _assert_reduced(da, da_ref, grad.cpu().float().abs().sum().reshape(1))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_aminmax(case, dtype):
    shape, axis, gs = case
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=gen) * 5).to(dtype).cuda()
    mn, mx = cupy_backend._aminmax_kernel(x, axis, gs)
    mn_ref, mx_ref = cupy_backend.aminmax_torch(x.cpu(), axis, gs)
    torch.testing.assert_close(mn.cpu(), mn_ref, atol=0, rtol=0)
    torch.testing.assert_close(mx.cpu(), mx_ref, atol=0, rtol=0)
    mn2, mx2 = cupy_backend.aminmax(x, axis, gs)
    torch.testing.assert_close(mn2.cpu(), mn_ref, atol=0, rtol=0)
    torch.testing.assert_close(mx2.cpu(), mx_ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["transposed", "strided", "channels_last", "unaligned", "expanded_grad"])
def test_non_contiguous_and_unaligned_inputs(dtype, layout):
    gen = torch.Generator().manual_seed(11)
    if layout == "channels_last":
        x0 = torch.randn(4, 24, 7, 9, generator=gen).to(dtype).cuda().to(memory_format=torch.channels_last)
        axis = 1
    elif layout == "transposed":
        x0 = torch.randn(96, 40, generator=gen).to(dtype).cuda().t()
        axis = 0
    elif layout == "strided":
        x0 = torch.randn(40, 192, generator=gen).to(dtype).cuda()[:, ::2]
        axis = 1
    else:  # a view one element into its storage: not 16-byte aligned, so the scalar kernels run
        x0 = torch.randn(40 * 96 + 1, generator=gen).to(dtype).cuda()[1:].view(40, 96)
        axis = 0
    assert layout in ("unaligned", "expanded_grad") or not x0.is_contiguous()
    c = x0.shape[axis]
    s = (torch.rand(c, generator=gen) * 0.3 + 0.05).cuda()
    z = torch.randint(-8, 8, (c,), generator=gen).float().cuda()
    if layout == "expanded_grad":
        grad = torch.randn(1, x0.shape[1], generator=gen).to(dtype).cuda().expand(x0.shape)
    else:
        grad = torch.randn(x0.shape, generator=gen).to(dtype).cuda()
        grad = grad.t().contiguous().t() if layout == "transposed" else grad
    xc = x0.cpu()
    y, m = cupy_backend.fake_quantize_forward(x0, s, z, -8, 7, axis=axis)
    y_ref, m_ref = reference.fake_quantize_forward(xc, s.cpu(), z.cpu(), -8, 7, axis=axis)
    _assert_values(y, y_ref, s, x0, axis, None)
    torch.testing.assert_close(m.cpu(), m_ref, atol=0, rtol=0)
    torch.testing.assert_close(
        cupy_backend.fake_quantize_backward(grad, m).cpu(),
        reference.fake_quantize_backward(grad.cpu(), m_ref),
        atol=0,
        rtol=0,
    )
    dx, ds, dz = cupy_backend.fake_quantize_lsq_backward(grad, x0, s, z, -8, 7, axis=axis, grad_factor=0.5)
    dx_ref, ds_ref, dz_ref = reference.fake_quantize_lsq_backward(
        grad.cpu(), xc, s.cpu(), z.cpu(), -8, 7, axis=axis, grad_factor=0.5
    )
    torch.testing.assert_close(dx.cpu(), dx_ref, atol=0, rtol=0)
    bound = _per_param_abs_sum(grad.cpu(), xc, axis, None) * 16
    _assert_reduced(ds, ds_ref, bound)
    _assert_reduced(dz, dz_ref, bound * s.cpu())


@pytest.mark.parametrize("estimator", ["ste", "lsq", "pact"])
def test_public_ops_autograd_on_gpu(estimator):
    """The public ops dispatch CUDA tensors to the kernels; their gradients equal the CPU reference's."""
    from qat.kernels import backend_name, fake_quantize, fake_quantize_lsq, fake_quantize_pact

    assert backend_name("cuda") == "cupy"
    gen = torch.Generator().manual_seed(5)
    x_cpu = torch.randn(32, 200, generator=gen) * 2
    s_cpu = torch.rand(32, generator=gen) * 0.2 + 0.05
    z_cpu = torch.randint(-8, 8, (32,), generator=gen).float()
    grad = torch.randn(32, 200, generator=gen)
    outs = []
    for dev in ("cpu", "cuda"):
        x = x_cpu.to(dev).requires_grad_()
        s = s_cpu.to(dev).requires_grad_()
        z = z_cpu.to(dev).requires_grad_()
        if estimator == "ste":
            y = fake_quantize(x, s.detach(), z.detach(), -8, 7, axis=0)
            params = [x]
        elif estimator == "lsq":
            y = fake_quantize_lsq(x, s, z, -8, 7, axis=0, grad_factor=1 / math.sqrt(200 * 7))
            params = [x, s, z]
        else:
            alpha = torch.tensor([1.5], device=dev, requires_grad=True)
            y = fake_quantize_pact(x, alpha, 0, 15)
            params = [x, alpha]
        grads = torch.autograd.grad(y, params, grad.to(dev))
        outs.append((y.detach().cpu(), [g.cpu() for g in grads]))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, atol=0, rtol=0)
    torch.testing.assert_close(g1[0], g0[0], atol=0, rtol=0)
    for a, b in zip(g1[1:], g0[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_runs_on_the_current_stream():
    """Kernels are ordered after work queued on a side stream that PyTorch made current."""
    side = torch.cuda.Stream()
    x = torch.randn(4096, 1024, device="cuda")
    s = torch.full((1,), 0.05, device="cuda")
    z = torch.zeros(1, device="cuda")
    with torch.cuda.stream(side):
        torch.cuda._sleep(20_000_000)  # keep the side stream busy, then produce x
        x2 = x * 2
        y, _ = cupy_backend.fake_quantize_forward(x2, s, z, -128, 127)
    torch.cuda.current_stream().wait_stream(side)
    y_ref, _ = reference.fake_quantize_forward(x.cpu() * 2, s.cpu(), z.cpu(), -128, 127)
    torch.testing.assert_close(y.cpu(), y_ref, atol=0, rtol=0)



def _check_channel_slices(xf, yf, m, s, z, K, slices):
    """Per-channel (axis 0, channels of K elements) int8 fake-quant of flat ``xf`` against the
    reference on each ``(start, stop)`` slice (``start`` a multiple of 32: whole mask words): the
    values channel by channel, and the mask recomputed from scratch. Returns ``(start, stop, keep)``
    per slice."""
    out = []
    for start, stop in slices:
        for r0 in sorted({start // K, (stop - 1) // K}):
            a, b = max(start, r0 * K), min(stop, (r0 + 1) * K)
            y_ref, _ = reference.fake_quantize_forward(xf[a:b], s[r0 : r0 + 1], z[r0 : r0 + 1], -128, 127)
            torch.testing.assert_close(yf[a:b], y_ref, atol=0, rtol=0)
        keep = reference.unpack_mask(m[start // 32 : -(-stop // 32)], stop - start)
        rows = torch.arange(start, stop, device="cuda") // K
        q_raw = torch.round(xf[start:stop].float() * (1.0 / s[rows])) + z[rows]
        torch.testing.assert_close(keep, (q_raw >= -128) & (q_raw <= 127), atol=0, rtol=0)
        out.append((start, stop, keep))
    return out

def test_more_than_2_pow_31_elements():
    """float16, 3 channels of 715,827,894 elements: 2^31 + 34 in all, so 64-bit indexing is needed."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip(f"needs 24 GiB of free GPU memory, {free / 2**30:.1f} available")
    C, K = 3, 715_827_894
    n = C * K
    assert n > 2**31
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((C, K), generator=gen, device="cuda", dtype=torch.float16)
    s = torch.tensor([0.01, 0.02, 0.04], device="cuda")
    z = torch.tensor([0.0, 3.0, -5.0], device="cuda")
    y, m = cupy_backend.fake_quantize_forward(x, s, z, -128, 127, axis=0)
    grad = torch.randn((C, K), generator=gen, device="cuda", dtype=torch.float16)
    dx = cupy_backend.fake_quantize_backward(grad, m)
    xf, yf, gf, dxf = x.view(-1), y.view(-1), grad.view(-1), dx.view(-1)
    # slices (starts multiple of 32, so whole mask words) at the start, across 2^31, at the end and
    # across a channel boundary
    slices = ((0, 4096), (2**31 - 4096, n), (n - 2082, n), (K // 32 * 32 - 64, K // 32 * 32 + 64))
    for start, stop, keep in _check_channel_slices(xf, yf, m, s, z, K, slices):
        torch.testing.assert_close(dxf[start:stop], torch.where(keep, gf[start:stop], 0), atol=0, rtol=0)
    assert int(reference.mask_words(n)) == m.numel()
    del y, m, dx
    # LSQ backward: dx at the far end and the per-channel reduction over 715M elements a channel
    dx, ds, dz = cupy_backend.fake_quantize_lsq_backward(grad, x, s, z, -128, 127, axis=0, grad_factor=1e-3)
    dxf = dx.view(-1)
    dx_ref, _, _ = reference.fake_quantize_lsq_backward(
        gf[n - 4096 :], xf[n - 4096 :], s[2:3], z[2:3], -128, 127, grad_factor=1e-3
    )
    torch.testing.assert_close(dxf[n - 4096 :], dx_ref, atol=0, rtol=0)
    chunk = 2**26
    for c in range(C):
        ds_ref = torch.zeros((), dtype=torch.float64, device="cuda")
        bound = torch.zeros((), dtype=torch.float64, device="cuda")
        for a in range(c * K, (c + 1) * K, chunk):
            b = min(a + chunk, (c + 1) * K)
            _, ds_c, _ = reference.fake_quantize_lsq_backward(
                gf[a:b], xf[a:b], s[c : c + 1], z[c : c + 1], -128, 127, grad_factor=1e-3
            )
            ds_ref += ds_c.double().sum()
            bound += gf[a:b].float().abs().sum().double() * 256e-3
        assert abs(float(ds[c]) - float(ds_ref)) <= 1e-4 * float(bound), (c, float(ds[c]), float(ds_ref))


def _spy(monkeypatch) -> list:
    """Record the names of the kernels the backend fetches (returned list, filled as they launch)."""
    launched: list = []
    kernel = cupy_backend._kernel

    def record(name, kern, *args):
        launched.append(kern)
        return kernel(name, kern, *args)

    monkeypatch.setattr(cupy_backend, "_kernel", record)
    return launched


def _knob_id(knobs: dict) -> str:
    return "-".join(f"{n}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for n, v in knobs.items())


NO_TILE = (0, 0, 0)  # per-group layouts on the grp kernels
ALL_HALF = dict(cols_half_lsq=(True, True, True), cols_half_minmax=(True, True, True))


def _vec(dtype) -> int:
    """Elements of one 16-byte vector load."""
    return 16 // torch.tensor([], dtype=dtype).element_size()


# tunings of the reduction kernels that the defaults do not exercise on these layouts: per-group layouts
# on the grp kernels instead of tiles (with 4 loads a lane and one unit per warp); channel-last
# reductions on the full-vector cols kernels in every dtype; a short-row threshold that sends channel-0
# layouts of ~1000 elements to the rows kernels, and one that keeps every layout off them (seg kernels)
KNOBS = [
    dict(grp_loads_minmax=4, grp_loads_lsq=4, grp_waves=100000, tile_lsq=NO_TILE, tile_minmax=NO_TILE),
    dict(tile_lsq=NO_TILE, tile_minmax=NO_TILE),
    dict(cols_half_lsq=(False, False, False), cols_half_minmax=(False, False, False)),
    dict(rows_min_vecs=64),
    dict(rows_min_vecs=2**40),
]
KNOB_CASES = [
    ((5, 16392), 0, None),
    ((2, 3, 8200), 1, None),
    ((3, 5, 4099), 1, None),
    ((512, 1000), 0, None),
    ((257, 1031), 1, None),
    ((1000, 4), 1, None),
    ((64, 2048), 1, None),
    ((64, 2048), None, 128),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=_knob_id)
@pytest.mark.parametrize("case", KNOB_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reduction_launch_knobs(knobs, case, dtype, tune):
    tune(**knobs)
    _check_reductions(case, dtype)


# reduce.cu's tile kernels (per-group layouts launched one tile a block): loads per lane T and block
# sizes, groups whose run is 1 to 32 vectors, tensors smaller than one tile and a partial last tile
TILE_KNOBS = [
    dict(tile_lsq=(t, t, t), tile_minmax=(t, t, t), tile_threads=th)
    for t, th in ((2, 64), (4, 64), (8, 32), (4, 256), (2, 128), (4, 128), (8, 64), (2, 256))
]
TILE_CASES = [
    ((64, 2048), None, 128),
    ((64, 2048), None, 32),
    ((4, 96), None, 32),
    ((3, 4100), None, 4),
    ((7, 256), None, 256),
    ((1, 384), None, 128),
    ((33, 1000), None, 8),
    ((3, 5, 4096), None, 64),
    ((9, 2176), None, 128),
]


@pytest.mark.parametrize("knobs", TILE_KNOBS, ids=lambda k: f"T{k['tile_lsq'][0]}-threads{k['tile_threads']}")
@pytest.mark.parametrize("case", TILE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tile_kernels(knobs, case, dtype, tune, monkeypatch):
    tn = tune(**knobs)
    launched = _spy(monkeypatch)
    _check_reductions(case, dtype)
    shape, _, gs = case
    vec = _vec(dtype)
    if gs % vec:
        vec = 1  # unaligned groups: scalar loads
    t = knobs["tile_lsq"][0]
    c = math.prod(shape) // gs
    # layouts at most cols_max_width wide go to the cols kernels first; runs over 32 vectors to grp
    use_tile = gs // vec <= 32 and not cupy_backend._use_cols(gs, c, tn)
    expected = [f"minmax_tile{t}", f"lsq_backward_tile{t}"] if use_tile else []
    assert [k for k in launched if "_tile" in k] == expected, launched


def _check_reductions(case, dtype):
    """aminmax exactly, and the LSQ backward (dx bit-exact, reduced gradients within the bound)."""
    shape, axis, gs = case
    gen = torch.Generator().manual_seed(5 + zlib.crc32(repr((shape, axis, gs, dtype)).encode()))
    x = (torch.randn(shape, generator=gen) * 5).to(dtype).cuda()
    mn, mx = cupy_backend._aminmax_kernel(x, axis, gs)
    mn_ref, mx_ref = cupy_backend.aminmax_torch(x.cpu(), axis, gs)
    torch.testing.assert_close(mn.cpu(), mn_ref, atol=0, rtol=0)
    torch.testing.assert_close(mx.cpu(), mx_ref, atol=0, rtol=0)
    x, s, z, qmin, qmax = _make(shape, dtype, 4, True, axis, gs, gen)
    grad = torch.randn(shape, generator=gen).to(dtype).cuda()
    dx, ds, dz = cupy_backend.fake_quantize_lsq_backward(grad, x, s, z, qmin, qmax, axis, gs, 0.5, "half_even")
    dx_ref, ds_ref, dz_ref = reference.fake_quantize_lsq_backward(
        grad.cpu(), x.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs, 0.5, "half_even"
    )
    torch.testing.assert_close(dx.cpu(), dx_ref, atol=0, rtol=0)
    bound = _per_param_abs_sum(grad.cpu(), x.cpu(), axis, gs) * (qmax - qmin + 1) * 0.5
    _assert_reduced(ds, ds_ref, bound)
    _assert_reduced(dz, dz_ref, bound * s.cpu().abs().reshape(bound.shape))



# grids of the element-wise kernels: a tiny grid (many grid-stride iterations per warp) and one so
# large that most warps have no step; key mode 1 on the grid-stride forward (fwd_tile off) whatever
# the default
@pytest.mark.parametrize(
    "knobs",
    [
        dict(elementwise_waves=0.01, fwd_tile=NO_TILE),
        dict(elementwise_waves=10000, fwd_tile=NO_TILE),
        dict(fwd_tile=NO_TILE),
    ],
    ids=_knob_id,
)
@pytest.mark.parametrize(
    "case",
    [((7,), None, None), ((5, 130), None, 10), ((257, 1031), 0, None), ((64, 2048), None, 128), ((16, 384, 96), 2, None)],
    ids=_case_id,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elementwise_grid_knobs(knobs, case, dtype, tune):
    tune(**knobs)
    test_fake_quantize_forward_backward(case, dtype)
    shape, axis, gs = case
    gen = torch.Generator().manual_seed(7 + zlib.crc32(repr((shape, axis, gs, dtype)).encode()))
    x, s, z, qmin, qmax = _make(shape, dtype, 4, True, axis, gs, gen)
    y = cupy_backend.fake_quantize_lsq_forward(x, s, z, qmin, qmax, axis, gs, "half_even")
    y_ref = reference.fake_quantize_lsq_forward(x.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs, "half_even")
    _assert_values(y, y_ref, s, x, axis, gs)


# fake_quant.cu's tile forward of key mode 1 (fq_forward_t<T>_<variant>_1: one tile a block, 32-bit
# offsets): warp steps per warp T, block sizes, both step orders; per-group and per-channel layouts
# whose inner size is a multiple of the vector (and scalar loads where it is not 16-byte aligned),
# tensors smaller than one tile and partial last tiles and steps
FWD_TILE_KNOBS = [
    dict(fwd_tile=(t, t, t), fwd_tile_threads=th) for t, th in ((1, 128), (2, 128), (1, 256), (4, 64), (4, 32), (2, 256))
]
FWD_TILE_CASES = [
    ((64, 2048), None, 128),
    ((64, 2048), None, 32),
    ((4, 96), 0, None),
    ((3, 40000), 0, None),
    ((8, 16, 4, 4), 1, None),
    ((33, 1000), None, 8),
    ((2, 3, 8200), 1, None),
    ((5, 130), None, 10),
]


@pytest.mark.parametrize("knobs", FWD_TILE_KNOBS, ids=lambda k: f"T{k['fwd_tile'][0]}-threads{k['fwd_tile_threads']}")
@pytest.mark.parametrize("case", FWD_TILE_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_tile_kernels(knobs, case, dtype, tune, monkeypatch):
    tune(**knobs)
    launched = _spy(monkeypatch)
    test_fake_quantize_forward_backward(case, dtype)
    shape, axis, gs = case
    gen = torch.Generator().manual_seed(9 + zlib.crc32(repr((shape, axis, gs, dtype)).encode()))
    for bits, signed, mode in ((4, True, "half_even"), (8, False, "half_away"), (3, True, "half_up")):
        x, s, z, qmin, qmax = _make(shape, dtype, bits, signed, axis, gs, gen)
        z = z + (torch.rand(z.shape, generator=gen).cuda() - 0.5) * 3
        y = cupy_backend.fake_quantize_lsq_forward(x, s, z, qmin, qmax, axis, gs, mode)
        y_ref = reference.fake_quantize_lsq_forward(x.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs, mode)
        _assert_values(y, y_ref, s, x, axis, gs)
    # the tile kernel ran wherever the layout is key mode 1 (a key per vector), the 64-bit one nowhere
    inner, c = Layout(axis=axis, group_size=gs).index_rule(x.shape)
    vec = _vec(dtype)
    t = knobs["fwd_tile"][0]
    key1 = c > 1 and inner % vec == 0
    assert {k for k in launched if k.startswith("fq_forward_t")} == ({f"fq_forward_t{t}_0_1", f"fq_forward_t{t}_1_1"} if key1 else set()), launched
    assert not {"fq_forward_0_1", "fq_forward_1_1"} & set(launched), launched
    # scalar loads: a view one element into its storage (not 16-byte aligned): key mode 1 wherever C > 1
    launched.clear()
    n = math.prod(shape)
    xu = torch.randn(n + 1, generator=gen).to(dtype).cuda()[1:].view(shape)
    y, m = cupy_backend.fake_quantize_forward(xu, s, z, qmin, qmax, axis, gs)
    y_ref, m_ref = reference.fake_quantize_forward(xu.cpu(), s.cpu(), z.cpu(), qmin, qmax, axis, gs)
    _assert_values(y, y_ref, s, xu, axis, gs)
    torch.testing.assert_close(m.cpu(), m_ref, atol=0, rtol=0)
    assert (f"fq_forward_t{t}_0_1" in launched) == (c > 1), launched


def test_forward_tile_falls_back_to_64_bit_offsets(tune, monkeypatch):
    """With the tile forward on, a key mode 1 tensor of more than 2^31 elements takes the 64-bit
    grid-stride kernel (fq_forward_0_1), and its values and mask are right across 2^31."""
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip(f"needs 12 GiB of free GPU memory, {free / 2**30:.1f} available")
    tune(fwd_tile=(2, 2, 2))
    launched = _spy(monkeypatch)
    C, K = 2, 2**30 + 64  # inner % 8 == 0: key mode 1
    n = C * K
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn((C, K), generator=gen, device="cuda", dtype=torch.float16)
    s = torch.tensor([0.01, 0.03], device="cuda")
    z = torch.tensor([2.0, -3.0], device="cuda")
    y, m = cupy_backend.fake_quantize_forward(x, s, z, -128, 127, axis=0)
    assert [k for k in launched if k.startswith("fq_forward")] == ["fq_forward_0_1"], launched
    xf, yf = x.view(-1), y.view(-1)
    # slices at the start, across the channel boundary, across 2^31 and at the end
    # (n = 2^31 + 128: the slice across 2^31 ends at n)
    _check_channel_slices(xf, yf, m, s, z, K, ((0, 4096), (K - 2048, K + 2048), (2**31 - 4096, n), (n - 4096, n)))


# reduce.cu's colsh kernels (cols with QAT_VEC / 2 columns a thread, 8-byte accesses): channels on the
# last axis, per-group layouts at most cols_max_width wide (keys changing inside a thread's columns),
# row counts that are not a multiple of the block's rows, a block wider than the row, blocks of 8-64
# half vectors
COLSH_KNOBS = [dict(ALL_HALF), dict(ALL_HALF, cols_half_vecs=32), dict(ALL_HALF, cols_half_vecs=8)]
COLSH_CASES = [
    ((64, 2048), 1, None),
    ((257, 1040), 1, None),
    ((16, 384, 96), 2, None),
    ((37, 40), 1, None),
    ((4, 96), None, 3),
    ((4, 96), None, 32),
    ((1000, 4), 1, None),
]


@pytest.mark.parametrize("knobs", COLSH_KNOBS, ids=lambda k: f"vecs{k.get('cols_half_vecs', 'default')}")
@pytest.mark.parametrize("case", COLSH_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cols_half_kernels(knobs, case, dtype, tune, monkeypatch):
    tn = tune(**knobs)
    launched = _spy(monkeypatch)
    _check_reductions(case, dtype)
    shape, axis, gs = case
    x = torch.empty(shape)
    inner, c = Layout(axis=axis, group_size=gs).index_rule(x.shape)
    vec = _vec(dtype)
    wd = c * inner
    assert cupy_backend._use_cols(inner, c, tn)
    half = wd % vec == 0  # 16-byte vectors possible: their halves; else the scalar cols kernel
    assert [k for k in launched if "_cols" in k] == (
        ["minmax_colsh", "lsq_backward_colsh"] if half else ["minmax_cols", "lsq_backward_cols"]
    ), launched


# per-tensor reductions on the rows kernels (virtual rows, one atomic a row; the tail past the last
# whole row on the seg kernel): thresholds lowered so small tensors take that path, rows that divide
# the tensor and rows that leave a tail, a tail that is not a whole vector
TENSOR_ROWS_KNOBS = [
    dict(tensor_rows=8, tensor_rows_min_waves=0, rows_min_vecs=16),
    dict(tensor_rows=4096, tensor_rows_min_waves=0, rows_min_vecs=16),
    dict(tensor_rows=4096, tensor_rows_min_waves=0),
]
TENSOR_ROWS_CASES = [
    ((64, 2048), None, None),
    ((5, 16392), None, None),
    ((3, 5, 4099), None, None),
    ((70001,), None, None),
    ((37,), None, None),
]


@pytest.mark.parametrize("knobs", TENSOR_ROWS_KNOBS, ids=_knob_id)
@pytest.mark.parametrize("case", TENSOR_ROWS_CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_rows_kernels(knobs, case, dtype, tune, monkeypatch):
    tn = tune(**knobs)
    launched = _spy(monkeypatch)
    _check_reductions(case, dtype)
    n = math.prod(case[0])
    vec = _vec(dtype)
    plan = cupy_backend._tensor_rows("minmax", n, 1, vec, torch.cuda.current_device(), tn)
    rows = [k for k in launched if k.endswith("_rows")]
    if plan is None:
        assert rows == [], launched
        return
    nrows, rowv = plan
    assert rows == ["minmax_rows", "lsq_backward_rows"], launched
    tail = n - nrows * rowv * vec
    assert ([k for k in launched if "_seg" in k] != []) == (tail > 0), (launched, tail)


def test_aminmax_dispatch_float32_per_tensor_and_axis0():
    """float32 per-tensor / axis-0 statistics go to the kernel where the rows kernels take them (large
    tensors), to torch.aminmax elsewhere; the public function is exact either way."""
    big = torch.randn(4096 * 1024, device="cuda")
    small = torch.randn(1000, device="cuda")
    tn = cupy_backend.current_tuning()
    assert cupy_backend._aminmax_use_kernel(big, None, None, tn)
    assert cupy_backend._aminmax_use_kernel(big.reshape(256, -1), 0, None, tn)
    assert not cupy_backend._aminmax_use_kernel(small, None, None, tn)
    assert not cupy_backend._aminmax_use_kernel(big[1:], None, None, tn)  # unaligned: scalar loads
    for x, axis in ((big, None), (big.reshape(256, -1), 0), (small, None), (big[1:], None)):
        mn, mx = cupy_backend.aminmax(x, axis)
        mn_ref, mx_ref = cupy_backend.aminmax_torch(x.cpu(), axis)
        torch.testing.assert_close(mn.cpu(), mn_ref, atol=0, rtol=0)
        torch.testing.assert_close(mx.cpu(), mx_ref, atol=0, rtol=0)
