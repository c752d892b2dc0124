"""The ``qat::`` ops that a traced graph calls: schemas, fake implementations, declared mutation
(``torch.library.opcheck``), and the gradients of a compiled model against eager ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from qat.kernels import fake_quantize_minmax

Q = torch.ops.qat


def _cases():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    s, z = torch.full((4, 2), 0.1), torch.zeros(4, 2)
    y, mask = Q.fake_quantize.default(x, s, z, -8, 7, None, 32, "half_even", None)
    state = (torch.zeros(8), torch.zeros(8), torch.zeros(8, dtype=torch.bool), torch.ones(8), torch.zeros(8))
    return [
        (Q.fake_quantize.default, (x, s, z, -8, 7, None, 32, "half_even", torch.bfloat16)),
        (Q.fake_quantize.default, (x, torch.full((4,), 0.1), torch.zeros(4), 0, 15, 0, None, "half_away", None)),
        (Q.fake_quantize_backward.default, (torch.randn(4, 64, dtype=torch.bfloat16), mask, torch.float32)),
        (Q.fake_quantize_backward_.default, (torch.randn(4, 64, dtype=torch.bfloat16), mask)),
        (Q.fake_quantize_lsq.default, (x, s, z, -8, 7, None, 32, 0.1, "half_even", None)),
        (Q.fake_quantize_lsq_backward.default, (torch.randn(4, 64), x, s, z, -8, 7, None, 32, 0.1, "half_even")),
        (Q.fake_quantize_pact.default, (x, torch.tensor([1.5]), 0, 15, "half_even", None)),
        (Q.fake_quantize_pact_backward.default, (torch.randn(4, 64), x, torch.tensor([1.5]))),
        (Q.fake_quantize_minmax.default, (x, 64, 0, 255, False, False, "half_even", torch.bfloat16)),
        (Q.fake_quantize_minmax_observe.default, (x, *state, 32, -8, 7, True, False, "half_even", None)),
        (Q.fake_quantize_float.default, (x, None, "e2m1", 32, "e8m0", None)),
        (Q.fake_quantize_float.default, (x, torch.full((4,), 0.01), "e4m3", 0, "none", 0)),
        (Q.fake_quantize_float_lsq_backward.default, (torch.randn(4, 64), x, torch.tensor([0.01]), "e2m1", 16, "e4m3", None, 0.5)),
    ]


@pytest.mark.parametrize("case", range(len(_cases())))
def test_registered_op_passes_opcheck(case):
    op, args = _cases()[case]
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_observe_op_updates_its_state_in_place():
    x = torch.tensor([[0.5, -1.0, 2.0, 0.25] * 8, [4.0, 0.0, -0.5, 1.0] * 8])
    state = (torch.zeros(2), torch.zeros(2), torch.zeros(2, dtype=torch.bool), torch.ones(2), torch.ones(2))
    y, _ = Q.fake_quantize_minmax_observe.default(x, *state, 32, -8, 7, True, False, "half_even", None)
    assert state[0].tolist() == [-1.0, -0.5] and state[1].tolist() == [2.0, 4.0] and state[2].all()
    assert torch.equal(y, fake_quantize_minmax(x, 32, -8, 7, symmetric=True))
    assert torch.allclose(state[3], torch.tensor([2.0, 4.0]) / 7.5) and not state[4].any()


PLANS = {
    "ste": "w4a8",  # per-group weights with their observer (minmax_observe), dynamic per-token inputs
    "lsq": "w4a4_lsq",
    "pact": {"rules": [{"match": "*", "weight": {"bits": 4, "granularity": "per_channel", "estimator": "lsq"},
                        "input": {"bits": 8, "signed": False, "estimator": "pact"}}]},
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_compiled_step_matches_eager(plan):
    """A compiled forward + backward (Inductor on the CPU) through every estimator's Function: the same
    output, gradients and observer state as eager (the observer op writes the weights' state in place)."""
    from qat import prepare

    torch.manual_seed(0)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), PLANS[plan])
    x = torch.randn(8, 64)
    model(x)  # learned scales initialized
    for p in model.parameters():
        p.grad = None
    y = model(x)
    y.square().sum().backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    model.zero_grad(set_to_none=True)
    if plan == "ste":  # the weights' observer state comes from the current weight: the compiled step rewrites it
        for n, b in model.named_buffers():
            if "weight_quantizer" in n and n.rsplit(".", 1)[-1] in ("scale", "min_val", "max_val"):
                b.zero_()
    torch._dynamo.reset()
    yc = torch.compile(model, fullgraph=True)(x)
    yc.square().sum().backward()
    torch.testing.assert_close(yc, y, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[n], rtol=1e-4, atol=1e-5, msg=n)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("out_dtype", [None, torch.bfloat16])
def test_compiled_ste_backward_equals_eager(out_dtype):
    """The clipped-STE backward in a traced graph gives eager's gradient, bit for bit, whatever the
    gradient it is given: an intermediate, the backward's input (left as it was), the backward of a
    sum (a view of one element: a formula that wrote into it zeroed every gradient), or a gradient
    another formula reads too (an add's, whose other input must get it unchanged)."""
    from qat.kernels import fake_quantize

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(6, 64, generator=g) * 3).requires_grad_()
    other = torch.randn(6, 64, generator=g).requires_grad_()
    s, z = torch.full((6,), 0.2), torch.zeros(6)
    w = torch.randn(6, 64, generator=g).to(out_dtype or torch.float32)
    seed = torch.randn(6, 64, generator=g).to(out_dtype or torch.float32)

    def fq(x):
        return fake_quantize(x, s, z, -8, 7, axis=0, out_dtype=out_dtype)

    cases = {
        "inner": lambda x, o: fq(x) * w,  # the gradient reaching the op is an intermediate (seed * w)
        "outer": lambda x, o: fq(x),  # the backward's input
        "sum": lambda x, o: fq(x).sum(),  # an expanded view of one element
        "shared": lambda x, o: (fq(x) + o).square().sum(),  # the same gradient for both of the add's inputs
    }
    for name, fn in cases.items():
        seed_arg = seed if name in ("inner", "outer") else None
        fn(x, other).backward(seed_arg)
        want, want_o = x.grad.clone(), None if other.grad is None else other.grad.clone()
        x.grad = other.grad = None
        torch._dynamo.reset()
        given = None if seed_arg is None else seed.clone()
        torch.compile(fn, fullgraph=True)(x, other).backward(given)
        assert torch.equal(x.grad, want), name
        assert (other.grad is None) == (want_o is None) and (want_o is None or torch.equal(other.grad, want_o)), name
        assert given is None or torch.equal(given, seed)
        assert bool((want == 0).any()) and bool((want != 0).any()) and want.dtype == torch.float32
        x.grad = other.grad = None


def test_in_place_backward_equals_out_of_place():
    from qat.kernels import reference

    g = torch.Generator().manual_seed(1)
    for n in (1, 31, 32, 33, 1000):
        grad = torch.randn(n, generator=g).to(torch.bfloat16)
        words = torch.randint(-(2**31), 2**31 - 1, (reference.mask_words(n),), generator=g, dtype=torch.int32)
        want = reference.fake_quantize_backward(grad, words)
        got = grad.clone()
        assert reference.fake_quantize_backward_(got, words) is got and torch.equal(got, want)


@pytest.mark.parametrize(
    "name", ["fake_quantize", "fake_quantize_minmax", "fake_quantize_minmax_observe", "fake_quantize_lsq", "fake_quantize_pact"]
)
def test_traced_autograd_registration_passes_opcheck(name):
    """The forward ops a compiled graph calls carry their own autograd (what Dynamo traces instead of an
    autograd.Function): opcheck's autograd and AOT-dispatch tests with x (and learned tensors) needing grad."""
    for op, args in _cases():
        if op is getattr(Q, name).default:
            args = tuple(a.clone().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                         for a in args)  # fmt: skip
            result = torch.library.opcheck(op, args)
            assert all(v == "SUCCESS" for v in result.values()), result
            return
    raise AssertionError(f"no case for {name}")


def test_observe_op_carries_its_own_autograd():
    """The weight observer's op (mutating its state) has an autograd kernel: a trace calls the op, not
    an autograd.Function; its gradient is the clipped STE and the state still updates in place."""
    from qat.kernels import ops

    assert ops._OBSERVE_AUTOGRAD
    x = torch.tensor([[0.5, -1.0, 2.0, 9.0] * 8], requires_grad=True)
    state = (torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.bool), torch.ones(1), torch.ones(1))
    y, mask = Q.fake_quantize_minmax_observe.default(x, *state, 32, -8, 7, True, False, "half_even", None)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_()
    want = fake_quantize_minmax(x2, 32, -8, 7, symmetric=True)
    want.sum().backward()
    assert torch.equal(y.detach(), want.detach()) and state[1].item() == 9.0 and state[2].all()
    assert torch.equal(x.grad, x2.grad) and x.grad.sum() == 24  # 9.0 -> code 7.5 -> 8 > qmax: clipped


@pytest.mark.parametrize("bad, match", [
    (dict(scale=torch.full((3,), 0.1)), "scale must have shape"),
    (dict(qmin=8), "need qmin < qmax"),
    (dict(round_mode="up"), "round_mode must be one of"),
])
def test_traced_call_checks_arguments_as_eager_does(bad, match):
    """A trace binds an op without checking its arguments in traced Python; the op's fake
    implementation checks them, with the eager call's message."""
    from qat.kernels import fake_quantize

    kw = dict(scale=torch.full((4,), 0.1), zero_point=torch.zeros(4), qmin=-8, qmax=7, axis=0, round_mode="half_even")
    kw.update(bad)
    if "scale" in bad:
        kw["zero_point"] = torch.zeros_like(kw["scale"])
    x = torch.randn(4, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        fake_quantize(x, **kw)
    torch._dynamo.reset()
    with pytest.raises(Exception, match=match):
        torch.compile(lambda t: fake_quantize(t, **kw), backend="eager", fullgraph=True)(x)
    torch._dynamo.reset()


def test_inductor_graph_calls_the_ops_without_their_python_autograd():
    """A graph Inductor compiles calls each forward op's twin without the Python autograd kernel (the
    registered formula still gives the backward): a compiled step pays no boxed redispatch per op."""
    from torch._inductor.utils import run_and_get_code

    from qat.kernels import fake_quantize_lsq, fake_quantize_minmax

    x = torch.randn(4, 64, requires_grad=True)
    s = torch.full((4, 2), 0.1, requires_grad=True)
    z = torch.zeros(4, 2)

    def fn(t):
        y = fake_quantize_lsq(t, s, z, -8, 7, group_size=32, grad_factor=0.1)
        return fake_quantize_minmax(y, 64, 0, 255).square().sum()

    fn(x).backward()
    want = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            _, codes = run_and_get_code(lambda: torch.compile(fn)(x).backward())
    finally:
        torch._dynamo.reset()
    code = "\n".join(codes)
    assert "qat.fake_quantize_lsq_impl.default(" in code and "qat.fake_quantize_minmax_impl.default(" in code
    assert "qat.fake_quantize_lsq.default(" not in code and "qat.fake_quantize_minmax.default(" not in code
    assert torch.equal(x.grad, want[0]) and torch.equal(s.grad, want[1])


def test_traced_quant_linear_writes_its_own_gradients_in_place():
    """In a compiled QuantLinear the quantizers' results feed its matmul alone, whose gradients are
    fresh tensors: the clipped STE zeroes their clipped elements in place (no pass over them), and
    the gradients are eager's."""
    from torch._inductor.utils import run_and_get_code

    from qat import prepare

    plan = {"rules": [{"match": "*", "types": ["Linear"],
                       "weight": {"bits": 4, "symmetric": True, "granularity": "per_group", "group_size": 32},
                       "input": {"bits": 8, "signed": False, "symmetric": False, "granularity": "per_token",
                                 "dynamic": True}}]}
    torch.manual_seed(0)
    eager = prepare(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)), plan)
    model = prepare(nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 8)), plan)
    model.load_state_dict(eager.state_dict())
    x = torch.randn(4, 5, 64) * 3
    eager(x).square().sum().backward()
    torch._dynamo.reset()
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            _, codes = run_and_get_code(lambda: torch.compile(model)(x).square().sum().backward())
    finally:
        torch._dynamo.reset()
    code = "\n".join(codes)
    # both weights and the second layer's input (the first layer's input, the data, takes no gradient)
    assert code.count("qat.fake_quantize_backward_.default(") == 3
    assert "qat.fake_quantize_backward.default(" not in code
    model.zero_grad(set_to_none=True)
    try:  # the same graph without Inductor's own numerics (its fused GELU): eager's gradients, bit for bit
        torch.compile(model, backend="aot_eager")(x).square().sum().backward()
    finally:
        torch._dynamo.reset()
    for (n, p1), p2 in zip(eager.named_parameters(), model.parameters()):
        assert torch.equal(p2.grad, p1.grad), n
