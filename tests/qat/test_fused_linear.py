"""QuantLinear's fused eager node (qat.modules._QuantLinearFn) against the unfused graph
(quantizer, quantizer, linear): same outputs, gradients and quantizer state, bit for bit."""

import copy

import pytest
import torch
import torch.nn as nn

from qat import LayerQuant, QuantSpec
from qat.modules import QuantLinear

ACT_DYN = dict(bits=8, signed=False, symmetric=False, granularity="per_token", dynamic=True)
W_STE = dict(bits=4, symmetric=True, granularity="per_group", group_size=16)
CASES = {
    "ste_w_dyn_a": (W_STE, ACT_DYN),
    "lsq_w_dyn_a": (dict(W_STE, estimator="lsq"), ACT_DYN),
    "ste_ch_w_ste_a": (dict(bits=4, granularity="per_channel", axis=0), dict(bits=8)),
    "ste_w_pact_a": (W_STE, dict(bits=4, signed=False, estimator="pact")),
    "lsq_plus_w_lsq_plus_a": (dict(bits=4, estimator="lsq_plus"), dict(bits=8, estimator="lsq_plus", symmetric=False)),
    "weight_only": (W_STE, None),
    "input_only": (None, ACT_DYN),
    "dyn_per_tensor_a": (W_STE, dict(bits=8, dynamic=True)),
}


def _pair(case, bias=True, device="cpu"):
    w, a = CASES[case]
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias).to(device)
    lq = LayerQuant(None if w is None else QuantSpec(**w), None if a is None else QuantSpec(**a))
    fused = QuantLinear.from_float(lin, lq)
    plain = copy.deepcopy(fused)
    # a forward hook on a quantizer keeps the layer unfused (the hook must see the call)
    for q in (plain.input_quantizer, plain.weight_quantizer):
        if q is not None:
            q.register_forward_hook(lambda m, i, o: None)
    return fused, plain


def _step(layer, x, autocast):
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=x.device)).sum().backward()
    grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return y, x.grad, grads, y.grad_fn


def _fused_equals_unfused(case, shape, autocast, device):
    fused, plain = _pair(case, device=device)
    torch.manual_seed(1)
    for step in range(3):  # the first step initializes learned scales; later steps use them
        x = torch.randn(shape, device=device) * (1 + step)
        yf, gxf, gf, fnf = _step(fused, x, autocast)
        yp, gxp, gp, fnp = _step(plain, x, autocast)
        assert type(fnf).__name__ == "_QuantLinearFnBackward"
        assert type(fnp).__name__ != "_QuantLinearFnBackward"
        assert yf.dtype == yp.dtype and torch.equal(yf, yp)
        assert torch.equal(gxf, gxp)
        assert gf.keys() == gp.keys()
        for k in gf:
            if device == "cuda" and "quantizer." in k:
                # a learned scale's / alpha's gradient is a sum over many elements that the GPU's
                # reductions add atomically, in no fixed order: equal to rounding, not bit for bit
                torch.testing.assert_close(gf[k], gp[k], rtol=1e-4, atol=1e-6, msg=k)
            else:
                assert torch.equal(gf[k], gp[k]), k
        for k, v in fused.state_dict().items():
            assert torch.equal(v, plain.state_dict()[k]), k
        fused.zero_grad(), plain.zero_grad()


SHAPES = {"2d": (5, 256), "3d": (2, 3, 256)}


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_unfused(case, shape, autocast):
    _fused_equals_unfused(case, SHAPES[shape], autocast, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", ["3d", "tokens"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_fused_equals_unfused_cuda(case, shape, autocast):
    from qat.kernels import backend_name

    assert backend_name("cuda") == "cupy"
    _fused_equals_unfused(case, {"3d": (2, 3, 256), "tokens": (4, 128, 256)}[shape], autocast, "cuda")


def test_no_bias_and_frozen_weight():
    fused, plain = _pair("ste_w_dyn_a", bias=False)
    for m in (fused, plain):
        m.weight.requires_grad_(False)
    x = torch.randn(4, 256)
    yf, gxf, gf, _ = _step(fused, x, torch.bfloat16)
    yp, gxp, gp, _ = _step(plain, x, torch.bfloat16)
    assert torch.equal(yf, yp) and torch.equal(gxf, gxp) and gf == {} == gp


def test_hooks_take_the_unfused_graph():
    fused, _ = _pair("ste_w_dyn_a")
    seen = []
    h = fused.input_quantizer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert type(fused(torch.randn(2, 256)).grad_fn).__name__ != "_QuantLinearFnBackward" and seen == [(2, 256)]
    h.remove()
    assert type(fused(torch.randn(2, 256)).grad_fn).__name__ == "_QuantLinearFnBackward"
    g = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert type(fused(torch.randn(2, 256)).grad_fn).__name__ != "_QuantLinearFnBackward"
    finally:
        g.remove()


def test_compiled_layer_is_unfused_and_equal():
    fused, plain = _pair("lsq_w_dyn_a")
    x = torch.randn(2, 3, 256)
    _step(fused, x, torch.bfloat16), _step(plain, x, torch.bfloat16)  # learned scales initialized, eagerly
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    yc, gxc, gc, _ = _step(compiled, x, torch.bfloat16)
    yp, gxp, gp, _ = _step(plain, x, torch.bfloat16)
    assert torch.equal(yc, yp) and torch.equal(gxc, gxp)


def test_fake_quant_disabled_and_calibration():
    fused, plain = _pair("ste_ch_w_ste_a")
    for m in (fused, plain):
        m.input_quantizer.enable_fake_quant(False)  # observes only: calibration
    x = torch.randn(6, 256)
    yf, gxf, _, _ = _step(fused, x, None)
    yp, gxp, _, _ = _step(plain, x, None)
    assert torch.equal(yf, yp) and torch.equal(gxf, gxp)
    assert torch.equal(fused.input_quantizer.observer.max_val, plain.input_quantizer.observer.max_val)


def test_reused_bound_op_still_checks_learned_values():
    """The op a quantizer binds once and re-uses checks its learned values at every call (CPU)."""
    fused, _ = _pair("lsq_w_dyn_a")
    x = torch.randn(2, 256)
    _step(fused, x, None), _step(fused, x, None)  # initialized, then the bound op re-used
    with torch.no_grad():
        fused.weight_quantizer.scale[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fake_quantize_lsq: scale must be finite"):
        fused(x)
