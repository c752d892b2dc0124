"""The public ops on the GPU inside ``torch.compile(fullgraph=True)`` and inside a captured CUDA graph
of a whole training step (forward, backward, optimizer step)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.kernels import backend_name, cupy_backend, fake_quantize, fake_quantize_lsq, fake_quantize_pact

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and cupy_backend.available()), reason="needs a CUDA GPU and CuPy"
    ),
]


class TinyQAT(nn.Module):
    """Two linear layers with the three estimators: LSQ per-channel weights, PACT activations,
    STE per-tensor activations and STE per-group weights."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 10)
        self.w1_scale = nn.Parameter(torch.full((128,), 0.02))
        self.w1_zp = nn.Parameter(torch.zeros(128))
        self.alpha = nn.Parameter(torch.tensor([4.0]))
        self.register_buffer("a_scale", torch.tensor([0.05]))
        self.register_buffer("a_zp", torch.zeros(1))
        self.register_buffer("w2_scale", torch.full((10, 4), 0.02))
        self.register_buffer("w2_zp", torch.zeros(10, 4))

    def forward(self, x):
        w1 = fake_quantize_lsq(self.fc1.weight, self.w1_scale, self.w1_zp, -8, 7, axis=0, grad_factor=1 / math.sqrt(64 * 7))
        h = F.linear(x, w1, self.fc1.bias)
        h = fake_quantize_pact(h, self.alpha, 0, 255)
        h = fake_quantize(h, self.a_scale, self.a_zp, 0, 255)
        w2 = fake_quantize(self.fc2.weight, self.w2_scale, self.w2_zp, -8, 7, group_size=32)
        return F.linear(h, w2, self.fc2.bias)


def _grads(model, x, y):
    model.zero_grad(set_to_none=True)
    out = model(x)
    F.cross_entropy(out, y).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.detach().clone() for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    return out.detach(), grads


def test_torch_compile_fullgraph_no_graph_break():
    assert backend_name("cuda") == "cupy"
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = TinyQAT().cuda()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)  # raises on any graph break
    x = torch.randn(32, 64, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    out_e, g_e = _grads(model, x, y)
    out_c, g_c = _grads(compiled, x, y)
    torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    assert g_c.keys() == g_e.keys()
    for name in g_e:
        torch.testing.assert_close(g_c[name], g_e[name], rtol=1e-3, atol=1e-5, msg=name)
    explained = torch._dynamo.explain(TinyQAT().cuda())(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_cuda_graph_captures_a_training_step():
    torch.manual_seed(0)
    model = TinyQAT().cuda()
    twin = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    batches = [(torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")) for _ in range(8)]
    static_x, static_y = batches[0][0].clone(), batches[0][1].clone()

    def step(m, o, x, y):
        out = m(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        o.step()
        return loss

    # warm up on a side stream (compiles and loads the kernels, builds the optimizer state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x, y in batches[:3]:
            static_x.copy_(x)
            static_y.copy_(y)
            opt.zero_grad(set_to_none=True)
            step(model, opt, static_x, static_y)
    torch.cuda.current_stream().wait_stream(side)
    for x, y in batches[:3]:
        opt_twin.zero_grad(set_to_none=True)
        step(twin, opt_twin, x, y)

    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x, static_y)

    for x, y in batches[3:]:
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()
        opt_twin.zero_grad(set_to_none=True)
        loss_twin = step(twin, opt_twin, x, y)
        torch.testing.assert_close(static_loss, loss_twin, rtol=1e-4, atol=1e-5)
    torch.cuda.synchronize()
    for (name, p), p_twin in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, p_twin, rtol=1e-4, atol=1e-5, msg=name)
    # the replays really trained: the parameters moved away from the warm-up state
    assert not torch.equal(model.w1_scale, torch.full((128,), 0.02, device="cuda"))
