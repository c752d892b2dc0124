"""Property-based parity of the CuPy kernels with the reference (GPU): hypothesis draws the shape,
strides (permuted, sliced, offset storage), bits, signedness, granularity, dtype, estimator and
rounding mode; the kernels must answer what the reference answers on the CPU."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qat.kernels import cupy_backend, reference  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy"
    ),
]


def _relayout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` (on the GPU) with other strides or an unaligned storage offset."""
    if layout == "permuted" and x.dim() >= 2:
        perm = list(reversed(range(x.dim())))
        return x.permute(perm).contiguous().permute(perm)
    if layout == "sliced" and x.dim() >= 1:
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        big[..., ::2] = x
        return big[..., ::2]
    if layout == "offset":
        buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        buf[1:] = x.reshape(-1)
        return buf[1:].view(x.shape)
    return x


@st.composite
def _cases(draw):
    ndim = draw(st.integers(0, 4))
    shape = tuple(draw(st.lists(st.integers(1, 13), min_size=ndim, max_size=ndim)))
    if ndim and draw(st.booleans()):  # sometimes one long axis, so vectors and several warps are used
        i = draw(st.integers(0, ndim - 1))
        shape = shape[:i] + (draw(st.integers(14, 700)),) + shape[i + 1 :]
    gran = draw(st.sampled_from(["tensor", "channel", "group"])) if ndim else "tensor"
    axis = gs = None
    if gran == "channel":
        axis = draw(st.integers(-ndim, ndim - 1))
    elif gran == "group":
        k = shape[-1]
        gs = draw(st.sampled_from([d for d in range(1, k + 1) if k % d == 0]))
    return dict(
        shape=shape,
        axis=axis,
        gs=gs,
        dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
        bits=draw(st.integers(2, 8)),
        signed=draw(st.booleans()),
        estimator=draw(st.sampled_from(["ste", "lsq", "pact"])),
        mode=draw(st.sampled_from(reference.ROUND_MODES)),
        layout=draw(st.sampled_from(["contiguous", "permuted", "sliced", "offset"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        factor=draw(st.sampled_from([1.0, 0.1, 0.0123])),
    )


def _exact_or_step(out, ref, step):
    out = out.cpu()
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    else:
        assert bool(((out.float() - ref.float()).abs() <= step).all())


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=_cases())
def test_kernels_equal_reference(case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape, axis, gs, dtype = case["shape"], case["axis"], case["gs"], case["dtype"]
    qmin, qmax = (-(2 ** (case["bits"] - 1)), 2 ** (case["bits"] - 1) - 1) if case["signed"] else (0, 2 ** case["bits"] - 1)
    if gs is not None:
        pshape = tuple(shape[:-1]) + (shape[-1] // gs,)
    elif axis is not None:
        pshape = (shape[axis],)
    else:
        pshape = (1,)
    x_cpu = (torch.randn(shape, generator=gen) * 3).to(dtype)
    g_cpu = torch.randn(shape, generator=gen).to(dtype)
    s_cpu = torch.rand(pshape, generator=gen) * 0.3 + 0.01
    z_cpu = torch.randint(qmin, qmax + 1, pshape, generator=gen).float()
    x = _relayout(x_cpu.cuda(), case["layout"])
    g = _relayout(g_cpu.cuda(), case["layout"])
    s, z = s_cpu.cuda(), z_cpu.cuda()
    mode = case["mode"]
    max_step = float(s_cpu.max())
    if case["estimator"] == "ste":
        y, m = cupy_backend.fake_quantize_forward(x, s, z, qmin, qmax, axis, gs, mode)
        y_ref, m_ref = reference.fake_quantize_forward(x_cpu, s_cpu, z_cpu, qmin, qmax, axis, gs, mode)
        _exact_or_step(y, y_ref, max_step)
        torch.testing.assert_close(m.cpu(), m_ref, atol=0, rtol=0)
        dx = cupy_backend.fake_quantize_backward(g, m)
        torch.testing.assert_close(dx.cpu(), reference.fake_quantize_backward(g_cpu, m_ref), atol=0, rtol=0)
    elif case["estimator"] == "lsq":
        z_l, z_l_cpu = z + 0.3, z_cpu + 0.3
        y = cupy_backend.fake_quantize_lsq_forward(x, s, z_l, qmin, qmax, axis, gs, mode)
        y_ref = reference.fake_quantize_lsq_forward(x_cpu, s_cpu, z_l_cpu, qmin, qmax, axis, gs, mode)
        _exact_or_step(y, y_ref, max_step)
        f = case["factor"]
        dx, ds, dz = cupy_backend.fake_quantize_lsq_backward(g, x, s, z_l, qmin, qmax, axis, gs, f, mode)
        dx_ref, ds_ref, dz_ref = reference.fake_quantize_lsq_backward(
            g_cpu, x_cpu, s_cpu, z_l_cpu, qmin, qmax, axis, gs, f, mode
        )
        torch.testing.assert_close(dx.cpu(), dx_ref, atol=0, rtol=0)
        # |term| <= (qmax - qmin + 1) * |g| * f: a bound of 1e-5 of the summed magnitudes
        tol = 1e-5 * float(g_cpu.float().abs().sum()) * (qmax - qmin + 1) * f + 1e-30
        torch.testing.assert_close(ds.cpu(), ds_ref, atol=tol, rtol=0)
        torch.testing.assert_close(dz.cpu(), dz_ref, atol=tol * max_step, rtol=0)
    else:
        alpha_cpu = torch.rand(1, generator=gen) * 3 + 0.2
        lo, hi = 0, qmax - qmin
        y = cupy_backend.fake_quantize_pact_forward(x, alpha_cpu.cuda(), lo, hi, mode)
        y_ref = reference.fake_quantize_pact_forward(x_cpu, alpha_cpu, lo, hi, mode)
        _exact_or_step(y, y_ref, float(alpha_cpu) / hi)
        dx, da = cupy_backend.fake_quantize_pact_backward(g, x, alpha_cpu.cuda())
        dx_ref, da_ref = reference.fake_quantize_pact_backward(g_cpu, x_cpu, alpha_cpu)
        torch.testing.assert_close(dx.cpu(), dx_ref, atol=0, rtol=0)
        torch.testing.assert_close(da.cpu(), da_ref, atol=1e-5 * float(g_cpu.float().abs().sum()) + 1e-30, rtol=0)
    mn, mx = cupy_backend._aminmax_kernel(x, axis, gs)
    mn_ref, mx_ref = cupy_backend.aminmax_torch(x_cpu, axis, gs)
    torch.testing.assert_close(mn.cpu(), mn_ref, atol=0, rtol=0)
    torch.testing.assert_close(mx.cpu(), mx_ref, atol=0, rtol=0)
