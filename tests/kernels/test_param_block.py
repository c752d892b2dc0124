"""Planned launches through a prepared parameter block (``KernelTuning.param_block``): the block holds
every argument at the kernel's declared size, and on a GPU both launch paths give the same results."""

from __future__ import annotations

import ctypes

import pytest
import torch

cupy_backend = pytest.importorskip("qat.kernels.cupy_backend")
np = pytest.importorskip("numpy")
if cupy_backend.cupy is None:
    pytest.skip("CuPy not importable", allow_module_level=True)

from qat.kernels.tuning import DEFAULT_TUNING  # noqa: E402


class _Function:
    ptr = 0xF00D


class _Kernel:
    kernel = _Function()


def test_block_lays_out_scalars_once_and_pointers_per_launch(monkeypatch):
    consts = (np.int64(-3), np.uint32(7), np.int32(-2), np.float32(1.5), np.int64(2**40 + 5))
    plan = cupy_backend._Plan(_Kernel(), (12, 2), 128, 64, consts, DEFAULT_TUNING, [])
    sizes = [8, 8] + [v.nbytes for v in consts] + [8]  # two pointers, the scalars, one tail pointer
    seen = []

    def launch(fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        slots = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        seen.append(((fn, gx, gy, gz, bx, by, bz, shared, stream, extra),
                     [ctypes.string_at(slots[i], size) for i, size in enumerate(sizes)]))

    monkeypatch.setattr(cupy_backend, "_launch_kernel", launch)
    block = cupy_backend._ParamBlock.make(plan, 2, 1)
    calls = [((0x1000, 0x2000), (0x3000,)), ((0xAB00, 0xCD00), (0,))]
    for ptrs, tail in calls:
        block.launch(ptrs, tail, 0x5)
    for (dims, args), (ptrs, tail) in zip(seen, calls):
        assert dims == (0xF00D, 12, 2, 1, 128, 1, 1, 64, 0x5, 0)
        assert args == [np.uint64(p).tobytes() for p in ptrs] + [v.tobytes() for v in consts] + [np.uint64(tail[0]).tobytes()]


def test_block_refused_for_arguments_it_cannot_lay_out():
    plan = cupy_backend._Plan(_Kernel(), (1,), 32, 0, (3, np.int64(1)), DEFAULT_TUNING, [])  # a Python int
    assert cupy_backend._ParamBlock.make(plan, 1, 0) is None


@pytest.mark.cuda
@pytest.mark.skipif(not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_launch_paths_agree_on_gpu(dtype):
    torch.manual_seed(0)
    x = (torch.randn(64, 256, device="cuda") * 3).to(dtype)
    g = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    s, z = torch.full((64, 2), 0.05, device="cuda"), torch.zeros(64, 2, device="cuda")
    out = {}
    for on in (True, False):
        state = tuple(torch.zeros(128, device="cuda") for _ in range(2)) + (torch.zeros(128, dtype=torch.bool, device="cuda"),) + tuple(
            torch.zeros(128, device="cuda") for _ in range(2))
        with cupy_backend.use_tuning(param_block=on):
            y, mask = cupy_backend.fake_quantize_forward(x, s, z, -8, 7, None, 128, "half_even", torch.bfloat16)
            dx = cupy_backend.fake_quantize_backward(g, mask, dtype)
            ym, mm = cupy_backend.fake_quantize_minmax_forward(x, 128, -8, 7, True, False, "half_even", state, torch.bfloat16)
        torch.cuda.synchronize()
        out[on] = (y, mask, dx, ym, mm, *state)
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a, b)
