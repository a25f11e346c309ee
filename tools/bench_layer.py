"""Benchmark the SMILE layer's forward against the base nn.Linear and a per-expert loop.

The loop is the straightforward mixture-of-experts dispatch (mask, index, add per expert, as
Mixtral-style code and the reference SMILE implementation do), computing the same function.
Overhead = layer time minus the base linear's time on the same input, measured in the same run.

    python tools/bench_layer.py                 # CPU float32 (and CUDA bf16 when present), Mistral-7B shapes
    python tools/bench_layer.py --quick         # E=4, k=128 only
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from smile_stream import SmileLinear
from smile_stream.modeling_smile import unpack_factors

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)


def make_layer(
    fan_in: int, fan_out: int, experts: int, rank: int, gate_rank: int, top_k: int, device: str, dtype: torch.dtype
) -> SmileLinear:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(fan_out, fan_in, generator=g) / fan_in**0.5
    downs = [torch.linalg.qr(torch.randn(fan_in, rank, generator=g)).Q.T.contiguous() for _ in range(experts)]
    ups = [torch.randn(fan_out, rank, generator=g) * 0.01 for _ in range(experts)]
    layer = SmileLinear.from_factors(weight, torch.zeros(fan_out), downs, ups, gate_rank, top_k)
    return layer.to(device, dtype).eval()


def base_linear(layer: SmileLinear) -> nn.Linear:
    """The plain base nn.Linear, sharing the layer's weight and bias (called as a module, like the others)."""
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    base.weight, base.bias = layer.weight, layer.bias
    return base


class Loop(nn.Module):
    """Per-expert dispatch: a separate gate matmul, then mask/index/add for each expert, over
    contiguous per-expert factors and gate weight prepared once (not timed)."""

    def __init__(self, layer: SmileLinear) -> None:
        super().__init__()
        self.layer = layer
        factors = unpack_factors(layer.expert_down, layer.expert_up, layer.ranks, layer.gate_rank)
        self.downs = [down.contiguous() for down, _ in factors]
        self.ups = [up.t().contiguous() for _, up in factors]  # (k, out): h @ up
        self.gate = torch.cat([down[: layer.gate_rank] for down in self.downs]).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        tokens = x.reshape(-1, layer.in_features)
        out = F.linear(tokens, layer.weight, layer.bias)
        g, e = layer.gate_rank, layer.num_experts
        logits = F.linear(tokens, self.gate).view(-1, e, g).float().norm(dim=-1)
        weights, selected = torch.softmax(logits, -1).topk(layer.top_k, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        mask = F.one_hot(selected, e).permute(2, 1, 0)
        for expert in range(e):
            slot, token = torch.where(mask[expert])
            if token.numel() == 0:
                continue
            h = F.linear(tokens[token], self.downs[expert]) @ self.ups[expert]
            out.index_add_(0, token, h * weights[token, slot, None])
        return out.view(*x.shape[:-1], -1)


class Floor(nn.Module):
    """The work no top-k SMILE layer can skip on a given input, with its routing decided in advance
    (not timed): the base matmul, the router-section matmul, and each expert's down- and
    up-projection of its own tokens, gathered in advance. No routing, gathering or adding."""

    def __init__(self, layer: SmileLinear, x: torch.Tensor) -> None:
        super().__init__()
        self.layer, tokens = layer, x.reshape(-1, layer.in_features)
        factors = unpack_factors(layer.expert_down, layer.expert_up, layer.ranks, layer.gate_rank)
        with torch.no_grad():
            _, index = layer._top(layer._logits(F.linear(tokens, layer.expert_down[: layer._gate_size])))
        self.work = [
            (tokens[(index == expert).any(-1)].contiguous(), down.contiguous(), up.t().contiguous())
            for expert, (down, up) in enumerate(factors)
            if (index == expert).any()
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        y = F.linear(x, layer.weight, layer.bias)
        F.linear(x, layer.expert_down[: layer._gate_size])
        for inputs, down, up in self.work:
            F.linear(inputs, down) @ up
        return y


def timeit(fns: list, x: torch.Tensor, device: str, repeats: int) -> tuple[float, list[float]]:
    """The first function's median time, and each function's overhead over it: the median over
    rounds of the difference within a round. Rounds interleave the functions, and pairing within
    a round keeps the slow drift of a shared machine out of the differences."""
    times: list[list[float]] = [[] for _ in fns]
    with torch.no_grad():
        for fn in fns:
            for _ in range(3):
                fn(x)
        for _ in range(repeats):
            for fn, bucket in zip(fns, times):
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                fn(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                bucket.append(time.perf_counter() - start)
    base = times[0]
    return statistics.median(base), [statistics.median(t - b for t, b in zip(bucket, base)) for bucket in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", action="append")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--gate-rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    args = parser.parse_args()
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    experts_list, ranks = ([4], [128]) if args.quick else ([2, 4, 8], [32, 128])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, gate rank {args.gate_rank}, top-{args.top_k}")
    print(
        "| device | dtype | in->out | E | k | tokens | base ms | SMILE / base | loop / base | floor / base "
        "| SMILE overhead / loop's | floor overhead / loop's | max abs diff SMILE vs loop |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    for device in devices:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        for fan_in, fan_out in SHAPES:
            for experts in experts_list:
                for rank in ranks:
                    layer = make_layer(fan_in, fan_out, experts, rank, args.gate_rank, args.top_k, device, dtype)
                    loop_forward = Loop(layer)
                    for tokens in (1, 512):
                        x = torch.randn(1, tokens, fan_in, generator=torch.Generator().manual_seed(tokens)).to(device, dtype)
                        repeats = args.repeats if tokens > 1 else args.repeats * 10
                        fns = [base_linear(layer), layer, loop_forward, Floor(layer, x)]
                        base, (_, smile, loop, floor) = timeit(fns, x, device, repeats)
                        with torch.no_grad():
                            diff = (layer(x).float() - loop_forward(x).float()).abs().max().item()
                        print(
                            f"| {device} | {str(dtype).removeprefix('torch.')} | {fan_in}->{fan_out} | {experts} | {rank} | {tokens} | "
                            f"{base * 1e3:.2f} | {1 + smile / base:.3f}x | {1 + loop / base:.3f}x | {1 + floor / base:.3f}x | "
                            f"{smile / loop:.2f} | {floor / loop:.2f} | {diff:.1e} |",
                            flush=True,
                        )
                    del layer, loop_forward

                    if device == "cuda":
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
