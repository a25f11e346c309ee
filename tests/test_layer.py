"""The SMILE layer against the published reference implementation's outputs (tests/data/reference)."""

import pytest
import torch
from conftest import REFERENCE_CASES, reference_file
from oracle import OracleSmileLinear
from safetensors import safe_open
from torch import nn

from smile_stream import SmileLinear
from smile_stream.modeling_smile import unpack_factors


def _linear(tensors: dict, prefix: str) -> nn.Linear:
    weight = tensors[prefix + ".weight"].float()
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=prefix + ".bias" in tensors)
    layer.weight.data = weight
    if layer.bias is not None:
        layer.bias.data = tensors[prefix + ".bias"].float()
    return layer


def _reference(case):
    handle = safe_open(str(reference_file(case)), "pt")
    meta = handle.metadata()
    tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    experts = [_linear(tensors, f"expert{i}") for i in range(int(meta["num_experts"]))]
    layer = SmileLinear.from_linears(
        _linear(tensors, "pretrained"), experts, int(meta["gate_k"]), int(meta["k"]), int(meta["top_k"])
    )
    return layer, tensors


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_matches_reference_implementation(case):
    layer, t = _reference(case)
    with torch.no_grad():
        y = layer(t["x"].float())
    torch.testing.assert_close(y, t["y"].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_one_token_at_a_time_matches_reference(case):
    # Single tokens take the sparse (decode) path where it applies; it must compute the same function.
    layer, t = _reference(case)
    x = t["x"].float().reshape(-1, t["x"].shape[-1])
    with torch.no_grad():
        y = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(y, t["y"].float().reshape(y.shape), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_routing_matches_reference(case):
    layer, t = _reference(case)
    x = t["x"].float().reshape(-1, t["x"].shape[-1])
    factors = unpack_factors(layer.expert_down, layer.expert_up, layer.ranks, layer.gate_rank)
    logits = torch.stack([(x @ down[: layer.gate_rank].t()).norm(dim=-1) for down, _ in factors], -1)
    if layer.num_experts > 1:  # with one expert the reference skips its gate and reports logits of 1
        torch.testing.assert_close(logits, t["router_logits"].float(), rtol=1e-4, atol=1e-5)
    weights = layer.routing_weights(logits)
    picked = weights.topk(layer.top_k, dim=-1)
    assert torch.equal(picked.indices.sort(-1).values, t["selected_experts"].long().sort(-1).values)


def test_uneven_ranks_and_low_rank_gate():
    # Experts of rank below the gate rank route on their own directions; null directions never route.
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    experts = []
    for rank in (2, 6, 9):
        e = nn.Linear(24, 16)
        e.weight.data = base.weight.data + torch.randn(16, rank) @ torch.randn(rank, 24)
        e.bias.data = base.bias.data.clone()
        experts.append(e)
    layer = SmileLinear.from_linears(base, experts, gate_rank=4, expert_rank=8, top_k=2)
    assert layer.ranks == [8, 8, 8]
    # rows beyond each delta's true rank are exactly zero
    (down, _), *_ = unpack_factors(layer.expert_down, layer.expert_up, layer.ranks, layer.gate_rank)
    assert down[2:8].abs().max() == 0
    x = torch.randn(5, 24)
    oracle = OracleSmileLinear.from_deltas(base, [(e.weight - base.weight, None, 8) for e in experts], gate_rank=4, top_k=2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), oracle(x.double()), rtol=1e-4, atol=1e-5)


def _small_layer(device="cpu", dtype=torch.float32, top_k=2):
    torch.manual_seed(0)
    base = nn.Linear(64, 48)
    experts = [nn.Linear(64, 48) for _ in range(4)]
    return SmileLinear.from_linears(base, experts, gate_rank=4, expert_rank=16, top_k=top_k).to(device, dtype), base, experts


def _loop_oracle(layer, base, experts, x):
    """Per token: route on the experts' top gate directions, add the routed rank-16 approximations."""
    deltas = [(e.weight - base.weight, e.bias - base.bias, 16) for e in experts]
    with torch.no_grad():
        return OracleSmileLinear.from_deltas(base, deltas, gate_rank=4, top_k=layer.top_k)(x.double().cpu())


def _each_path(layer, x):
    """The layer's output on x through each dispatch path that can take it (name -> output)."""
    paths = {"dense": layer._add_dense}
    if layer.top_k < layer.num_experts:
        paths["grouped"] = layer._add_grouped
    if layer._uniform:
        paths["sparse"] = layer._add_sparse
    with torch.no_grad():
        results = {"forward": layer(x), "one": torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])}
        assert "_pack" in layer.__dict__, "one token without autograd takes the packed decode path"
        for name, add in paths.items():
            results[name] = torch.nn.functional.linear(x, layer.weight, layer.bias)
            add(x, results[name])
    return results


@pytest.mark.parametrize("tokens", [1, 2, 40])
def test_every_dispatch_path_matches_per_token_oracle(tokens):
    # forward picks: 1 token, the in-place decode path; 2 tokens x top-2 >= 4 experts, grouped
    layer, base, experts = _small_layer()
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
    expected = _loop_oracle(layer, base, experts, x)
    for name, y in _each_path(layer, x).items():
        torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=5e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_every_path_with_uneven_ranks_and_bias_deltas(top_k):
    # Ranks around the gate rank 4: router sections of 2, 4 and 4 rows, no remaining rows for the
    # first two experts. Oracle: per token, straight from each expert's unpacked factors.
    g = torch.Generator().manual_seed(top_k)
    weight, bias = torch.randn(12, 20, generator=g), torch.randn(12, generator=g)
    downs = [torch.linalg.qr(torch.randn(20, r, generator=g)).Q.t() for r in (2, 4, 9)]
    ups = [torch.randn(12, r, generator=g) for r in (2, 4, 9)]
    deltas = [torch.randn(12, generator=g) for _ in range(3)]
    layer = SmileLinear.from_factors(weight, bias, downs, ups, gate_rank=4, top_k=top_k, bias_deltas=deltas)
    x = torch.randn(7, 20, generator=g)
    expected = OracleSmileLinear.from_factors(weight, bias, downs, ups, 4, top_k, deltas)(x.double())
    for name, y in _each_path(layer, x).items():
        torch.testing.assert_close(y.double(), expected, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_decoding_follows_every_change_to_the_parameters():
    # One token without autograd copies the down rows expert by expert; whatever happens to
    # the parameters afterwards (an in-place load, a dtype change, a replaced parameter) the output
    # must still be the oracle's for the parameters the layer holds then.
    layer, base, experts = _small_layer(top_k=1)
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))

    def decode():
        with torch.no_grad():
            return torch.cat([layer(x[i : i + 1].to(layer.weight.dtype)) for i in range(x.shape[0])]).double()

    def oracle():
        factors = unpack_factors(layer.expert_down.detach(), layer.expert_up.detach(), layer.ranks, 4)
        deltas = list(layer.expert_bias.detach())
        weight, bias = layer.weight.detach(), layer.bias.detach()
        return OracleSmileLinear.from_factors(weight, bias, *zip(*factors), 4, 1, deltas)(x.double())

    saved = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    weight = layer.weight.data_ptr()
    torch.testing.assert_close(decode(), oracle(), rtol=1e-4, atol=5e-5)
    assert "_pack" in layer.__dict__ and layer.weight.data_ptr() == weight, "W0 stays as loaded (mmap'd stays mapped)"
    for name, tensor in layer.state_dict().items():  # what a save writes is unchanged
        assert tensor.shape == saved[name].shape and torch.equal(tensor, saved[name]), name

    other, _, _ = _small_layer(top_k=1)
    with torch.no_grad():
        other.expert_down.mul_(-3.0)
        other.weight.add_(1.0)
    layer.load_state_dict(other.state_dict())  # in place into the packed views and expert_down
    torch.testing.assert_close(decode(), oracle(), rtol=1e-4, atol=5e-5)
    with torch.no_grad():
        layer.expert_down[:4].mul_(0.1)  # the router rows of expert 0, edited in place
    torch.testing.assert_close(decode(), oracle(), rtol=1e-4, atol=5e-5)
    layer.expert_up = nn.Parameter(torch.randn_like(layer.expert_up))
    torch.testing.assert_close(decode(), oracle(), rtol=1e-4, atol=5e-5)
    layer.to(torch.float64)
    torch.testing.assert_close(decode(), oracle(), rtol=1e-9, atol=1e-9)


def test_torch_compile_fullgraph():
    layer, base, experts = _small_layer(top_k=1)
    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        for tokens in (1, 24):  # the gather-based decode path, and the dense path
            x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(tokens))
            torch.testing.assert_close(compiled(x).double(), _loop_oracle(layer, base, experts, x), rtol=1e-4, atol=5e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_decode():
    layer, base, experts = _small_layer("cuda", top_k=1)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        for seed in range(4):  # replays of the captured graph with new inputs
            x = torch.randn(1, 64, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(
                compiled(x.cuda()).double().cpu(), _loop_oracle(layer, base, experts, x), rtol=1e-4, atol=5e-5
            )
