"""Weight quantizers initialized from the weights before the first step (qat.init_weight_quantizers):
the same state the first forward pass sets, so a model gives the same step either way, and nothing
for a weight that is not there yet."""

import pytest
import torch
import torch.nn as nn

from qat import LayerQuant, LayerRule, QuantLinear, QuantPlan, QuantSpec, init_weight_quantizers, prepare, quantizers

from .test_kquant_quantizer import lsq_plan

SPECS = {
    "lsq_channel": QuantSpec(bits=4, granularity="per_channel", axis=0, estimator="lsq"),
    "lsq_asym_group": QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=16, estimator="lsq"),
    "lsq_plus": QuantSpec(bits=3, symmetric=False, granularity="per_channel", axis=0, estimator="lsq_plus"),
    "ste_group": QuantSpec(bits=4, granularity="per_group", group_size=16),
    "fp8_lsq": QuantSpec(bits=8, granularity="per_channel", axis=0, format="fp8_e4m3", estimator="lsq"),
}


def _plan(spec: QuantSpec) -> QuantPlan:
    return QuantPlan([LayerRule(match="*", weight=spec)])


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "quantizer" in k}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_init_equals_first_forward(name):
    plan = _plan(SPECS[name])
    lazy, eager = prepare(_net(), plan), prepare(_net(), plan)
    # a quantizer whose every call sets its whole state from the weight (STE, min / max) starts
    # initialized (the layer observes its weight when made); the others wait for init or a batch
    assert all(q.is_initialized == q.tracks_current_weight for _, q in quantizers(eager))
    assert init_weight_quantizers(eager) == 2
    assert all(q.is_initialized for _, q in quantizers(eager))
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    ya, yb = lazy(x), eager(x)
    assert torch.equal(ya, yb)
    a, b = _state(lazy), _state(eager)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_kquant_learned_scales_init_equals_first_forward():
    lazy, eager = prepare(_net_kq(), lsq_plan("q4_k")), prepare(_net_kq(), lsq_plan("q4_k"))
    assert init_weight_quantizers(eager) == 1
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(2))
    assert torch.equal(lazy(x), eager(x))
    a, b = _state(lazy), _state(eager)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _net_kq() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 4))


def test_initialized_quantizers_are_left_alone():
    plan = _plan(SPECS["lsq_channel"])
    model = prepare(_net(), plan)
    init_weight_quantizers(model)
    q = model[0].weight_quantizer
    with torch.no_grad():
        q.scale.fill_(0.125)  # trained, or loaded from a checkpoint
    assert init_weight_quantizers(model) == 2
    assert bool((q.scale == 0.125).all())


def test_weights_not_materialized_are_left_to_the_first_forward():
    plan = _plan(SPECS["lsq_channel"])
    with torch.device("meta"):
        model = prepare(_net(), plan)
    assert init_weight_quantizers(model) == 0
    layer = QuantLinear.from_float(nn.Linear(32, 64), LayerQuant(weight=SPECS["lsq_channel"]))
    layer.weight = nn.Parameter(torch.randn(64 * 32))  # a flat shard, as FSDP holds it
    assert layer.init_weight_quantizer() is False and not layer.weight_quantizer.is_initialized


def test_dynamic_and_data_formats_keep_nothing():
    plan = _plan(QuantSpec(bits=4, granularity="per_group", group_size=32, format="mxfp4"))
    model = prepare(_net(), plan)
    before = _state(model)
    assert init_weight_quantizers(model) == 0
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ste_weight_quantizer_starts_from_the_weight_and_a_compiled_step_writes_no_flags():
    """An STE weight quantizer with a min / max observer is initialized when its layer is made, so a
    compiled step neither branches on a first observation nor writes the flags each step."""
    model = prepare(_net(), _plan(SPECS["ste_group"]))
    q = model[0].weight_quantizer
    assert q.tracks_current_weight and q.is_initialized and q.observer.is_initialized
    fresh = prepare(_net(), _plan(SPECS["ste_group"]))
    fresh[0].weight_quantizer.observer.reset()
    fresh[0].weight_quantizer.init_from(fresh[0].weight)
    assert all(torch.equal(a, b) for a, b in zip(_state(model).values(), _state(fresh).values()))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        x = torch.randn(5, 32)
        torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    finally:
        torch._dynamo.reset()
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op in ("call_function", "call_method")]
    assert sum("fake_quantize_minmax_observe" in t for t in targets) == 2
    assert not any("fill_" in t for t in targets), targets
