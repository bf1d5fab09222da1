"""CUDA graphs and host syncs of SparseMoE on the GPU: bf16, small shapes, every test @pytest.mark.gpu.

Graph capture and replay (torch.cuda.graphs):

    static buffers x [T, H] (and dy for the backward), filled with the first input set
    step = forward (under no_grad or inference_mode), or forward + backward from dy with every
           gradient set to None first, so the captured backward allocates the .grad tensors in the
           graph's pool and each replay writes them afresh (torch's whole-network recipe)
    warm-up: GRAPH_WARMUP steps on a side stream (compilation and lazy allocations stay out of the
           capture), then torch.cuda.CUDAGraph captures one step
    for each input set: copy it into the static buffers, replay, read the captured output (and
           grads), compare with an eager call of the same module on the same values

The input sets route differently from the one captured: another random batch, and a skewed one
whose every token picks expert 0 first (64 rows on one expert, none on some others). A routing
plan, tile count or kernel choice read on the host at capture time would be baked into the graph
and give wrong answers for them, and a replay that ignored the static input would repeat the
captured output; both fail the comparison, and the outputs of different sets must differ.

Host syncs: the layer under torch.cuda.set_sync_debug_mode("error"), which raises on any call that
makes the host wait for the GPU (a .item(), a device-to-host copy, a synchronize): inference
forward, forward + backward in eval and in training (aux losses attached), with and without LoRA.
A warm-up call runs first, outside the debug mode: the first call compiles the Triton kernels,
which is not the steady state a graph or a decode loop sees. Expert parallelism is left out: its
dropless all-to-all reads the split sizes on the host, a sync its docs state.
"""

import pytest
import torch
from tolerance import GRAPH_REPLAY_BF16, assert_max_err, max_err

from unimoe_kernels import SparseMoE

pytestmark = pytest.mark.gpu

# T=64 tokens, H=128, F=64, E=8, k=2: 16 rows per expert on average (the small-row tiles), every
# row 16-byte aligned in bf16 (TMA's rule), seconds of compilation. LoRA rank 8: rank-wide rows of
# 16 bytes too.
T, H, F, E, K, RANK = 64, 128, 64, 8, 2, 8
DTYPE = torch.bfloat16
GRAPH_WARMUP = 3  # torch's docs warm up 3 iterations on the side stream before capture


def _moe(lora: bool, training: bool) -> SparseMoE:
    gen = torch.Generator().manual_seed(0)
    moe = SparseMoE(H, F, E, K, lora_rank=RANK if lora else 0, aux_loss_coef=0.01, z_loss_coef=1e-3,
                    device="cuda", dtype=DTYPE)
    with torch.no_grad():
        for p in moe.parameters():  # seeded on the CPU, so the values do not depend on the CUDA RNG
            p.copy_(torch.rand(p.shape, generator=gen).sub_(0.5).mul_(2 / p.shape[-1] ** 0.5))
    return moe.train(training)


def _input_sets(moe: SparseMoE) -> list:
    """[x0 (captured), x1 (random, another seed), x_hot (every token's first choice is expert 0)]."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x0, x1, noise = (torch.randn(T, H, device="cuda", generator=gen) for _ in range(3))
    w0 = moe.router.weight[0].detach().float()
    # Logit of expert 0 ~ 8 * |w0| (4.6 here) against the others' ~N(0, 0.5): always the first choice.
    x_hot = 8 * w0 / w0.norm() + 0.5 * noise
    xs = [x.to(DTYPE) for x in (x0, x1, x_hot)]
    with torch.no_grad():
        first = moe.router(xs[2]).ids[:, 0]
    assert (first == 0).all(), "the skewed set must send every token to expert 0 first"
    return xs


def _grad_outs() -> list:
    gen = torch.Generator(device="cuda").manual_seed(2)
    return [torch.randn(T, H, device="cuda", generator=gen).to(DTYPE) for _ in range(3)]


def _capture(step):
    """(graph, what step returned during capture): step warmed up on a side stream, then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    torch.cuda.synchronize()
    return graph, out


def _assert_close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    # Graph and eager results may differ by the order of atomic sums (tolerance.GRAPH_REPLAY_BF16);
    # a stale or wrong replay is off by the order of the values themselves.
    assert torch.isfinite(got.detach()).all(), f"{name}: non-finite values"
    assert_max_err(got, want, GRAPH_REPLAY_BF16, what=name)


def _assert_differ(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    # 10x the tolerance: different inputs give outputs as far apart as the values themselves.
    assert max_err(a, b) > 10 * GRAPH_REPLAY_BF16.at(b), f"{name}: replays of different inputs agree"


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_forward_graph_replays_match_eager(grad_mode):
    moe = _moe(lora=False, training=False)
    xs = _input_sets(moe)
    static_x = xs[0].clone()

    def forward():
        with grad_mode():
            return moe(static_x)

    graph, static_y = _capture(forward)
    outs = []
    for i in (1, 2, 0):  # other sets first: a replay that ignored the copy would still match set 0
        static_x.copy_(xs[i])
        graph.replay()
        with grad_mode():
            want = moe(xs[i])
        _assert_close(f"y, input set {i}", static_y, want)
        outs.append(static_y.clone())
    _assert_differ("y", outs[0], outs[1])
    _assert_differ("y", outs[1], outs[2])


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_forward_backward_graph_replays_match_eager(lora):
    moe = _moe(lora=lora, training=True)  # training: the aux losses reach the router through backward
    params = [p for p in moe.parameters() if p.requires_grad]
    names = [n for n, p in moe.named_parameters() if p.requires_grad]
    xs, dys = _input_sets(moe), _grad_outs()
    static_x = xs[0].clone().requires_grad_(True)
    static_dy = dys[0].clone()

    def step():
        for t in (static_x, *params):
            t.grad = None  # the capture allocates fresh grads; replays overwrite them, never accumulate
        y = moe(static_x)
        y.backward(static_dy)
        return y

    graph, static_y = _capture(step)
    static_grads = [static_x.grad, *(p.grad for p in params)]
    assert all(g is not None for g in static_grads)
    outs = []
    for i in (1, 2, 0):
        with torch.no_grad():
            static_x.copy_(xs[i])
            static_dy.copy_(dys[i])
        graph.replay()
        # Eager on the same module: autograd.grad leaves the captured .grad tensors alone.
        x = xs[i].clone().requires_grad_(True)
        y = moe(x)
        want = torch.autograd.grad(y, [x, *params], dys[i])
        _assert_close(f"y, input set {i}", static_y, y)
        for name, got, w in zip(["x", *names], static_grads, want):
            _assert_close(f"d{name}, input set {i}", got, w)
        outs.append((static_y.detach().clone(), static_grads[0].clone()))
    for j, what in enumerate(("y", "dx")):
        _assert_differ(what, outs[0][j], outs[1][j])
        _assert_differ(what, outs[1][j], outs[2][j])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
def test_no_host_sync(lora, training):
    moe = _moe(lora=lora, training=training)
    x = _input_sets(moe)[2].requires_grad_(True)  # the skewed set: the most uneven expert loads
    dy = _grad_outs()[0]

    def calls():
        with torch.inference_mode():
            moe(x)
        with torch.no_grad():
            moe(x, return_aux=True)
        y, aux = moe(x, return_aux=True)
        (y.float() * dy.float()).sum().backward()
        return y, aux

    calls()  # warm-up: compiles the kernels (not the steady state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = calls()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(y.float()).all() and torch.isfinite(x.grad.float()).all()
    assert int(aux.tokens_per_expert.sum()) == T * K
