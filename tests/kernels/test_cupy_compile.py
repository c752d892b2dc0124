"""CPU checks of the CuPy backend (run in CI): every CUDA source compiles with NVRTC for every dtype
and vector width, without a GPU; and off the GPU every function answers with the reference."""

import pytest
import torch

from qat.kernels import cupy_backend, reference
from qat.kernels.tuning import DEFAULT_TUNING


def _nvrtc_version():
    pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        from cupy.cuda import nvrtc

        return nvrtc.getVersion()
    except Exception as exc:  # noqa: BLE001 - the library is missing or cannot be loaded
        pytest.skip(f"NVRTC is not installed ({exc}); install nvidia-cuda-nvrtc-cu12")


def _check_all(arch):
    _nvrtc_version()
    # A failure here is a real compile error (the RuntimeError carries NVRTC's log): it must fail, not skip.
    sizes = cupy_backend.compile_all(arch=arch)
    expected = set(cupy_backend._variants())
    assert set(sizes) == expected
    # fake_quant.cu and rows.cu: 7 (x dtype, y dtype) pairs (fp32 -> fp32 / fp16 / bf16, fp16 -> fp16 / bf16,
    # bf16 -> bf16 / fp16); reduce.cu and microscaling.cu: one dtype; each x {scalar, 16-byte vector}
    assert len(expected) == 2 * 7 * 2 + 2 * 3 * 2
    assert {v[0] for v in expected} == {"fake_quant.cu", "reduce.cu", "rows.cu", "microscaling.cu"}
    assert all(size > 0 for size in sizes.values())


def test_every_kernel_compiles_with_nvrtc():
    """Every source x dtype x vector width through NVRTC to PTX (about 20 s on 2 cores)."""
    _check_all("compute_90")


@pytest.mark.slow
def test_every_kernel_assembles_for_sm90():
    """The same down to sm_90 machine code, so the inline PTX is assembled too (about 60 s)."""
    _check_all("sm_90")


def test_each_kernel_compiles_alone():
    """A kernel's first launch compiles it alone (its template entry named by the host), so every
    entry must compile by itself and bring no other entry with it (bfloat16 x and y, 16-byte vectors;
    the whole-file compiles above cover every dtype)."""
    _nvrtc_version()
    for name, kernels in cupy_backend._KERNELS.items():
        out = 2 if name in cupy_backend._TWO_DTYPES else None
        for k in kernels:
            ptx, size = cupy_backend._compile(name, 2, 8, "compute_90", DEFAULT_TUNING, out, (k,))
            assert size > 0 and ptx.count(".entry ") == 1, (name, k)


def test_compile_error_is_reported(monkeypatch):
    _nvrtc_version()
    monkeypatch.setattr(cupy_backend, "_source", lambda name: "this is not CUDA;")
    monkeypatch.setattr(cupy_backend, "_KERNELS", {"broken.cu": ("k",)})
    with pytest.raises(RuntimeError, match="NVRTC failed on broken.cu"):
        cupy_backend.compile_all()


def test_cpu_tensors_use_the_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g)
    s = torch.rand(5, generator=g) * 0.1 + 0.01
    z = torch.zeros(5)
    y, m = cupy_backend.fake_quantize_forward(x, s, z, -8, 7, axis=0)
    y_ref, m_ref = reference.fake_quantize_forward(x, s, z, -8, 7, axis=0)
    torch.testing.assert_close(y, y_ref, atol=0, rtol=0)
    torch.testing.assert_close(m, m_ref, atol=0, rtol=0)
    mn, mx = cupy_backend.aminmax(x, axis=0)
    torch.testing.assert_close(mn, x.amin(dim=1), atol=0, rtol=0)
    torch.testing.assert_close(mx, x.amax(dim=1), atol=0, rtol=0)
    mn, mx = cupy_backend.aminmax(x, group_size=16)
    assert mn.shape == (5, 4)
    mn, mx = cupy_backend.aminmax(x)
    assert mn.shape == (1,) and mn.item() == x.min().item()
