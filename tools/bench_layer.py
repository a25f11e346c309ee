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
from functools import partial

import torch
import torch.nn.functional as F

from smile_stream import SmileLinear

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


def base_forward(layer: SmileLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def loop_forward(layer: SmileLinear, x: torch.Tensor) -> torch.Tensor:
    """Per-expert dispatch: a separate gate matmul, then mask/index/add for each expert."""
    tokens = x.reshape(-1, layer.in_features)
    out = F.linear(tokens, layer.weight, layer.bias)
    k, g, e = layer.ranks[0], layer.gate_rank, layer.num_experts
    downs = layer.expert_down.view(e, k, -1)
    ups = layer.expert_up.view(e, k, layer.out_features)
    gate = downs[:, :g, :].reshape(e * g, -1)
    logits = F.linear(tokens, gate).view(-1, e, g).float().norm(dim=-1)
    weights, selected = torch.softmax(logits, -1).topk(layer.top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
    mask = F.one_hot(selected, e).permute(2, 1, 0)
    for expert in range(e):
        slot, token = torch.where(mask[expert])
        if token.numel() == 0:
            continue
        h = F.linear(tokens[token], downs[expert]) @ ups[expert]
        out.index_add_(0, token, h * weights[token, slot, None])
    return out.view(*x.shape[:-1], -1)


def timeit(fns: list, x: torch.Tensor, device: str, repeats: int) -> list[float]:
    """Median time of each function, measured in interleaved rounds so that drift hits all alike."""
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
    return [statistics.median(bucket) for bucket in times]


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
        "| device | dtype | in->out | E | k | tokens | base ms | SMILE / base | loop / base | SMILE overhead / loop overhead | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        for fan_in, fan_out in SHAPES:
            for experts in experts_list:
                for rank in ranks:
                    layer = make_layer(fan_in, fan_out, experts, rank, args.gate_rank, args.top_k, device, dtype)
                    for tokens in (1, 512):
                        x = torch.randn(1, tokens, fan_in, generator=torch.Generator().manual_seed(tokens)).to(device, dtype)
                        repeats = args.repeats if tokens > 1 else args.repeats * 10
                        base, smile, loop = timeit(
                            [partial(base_forward, layer), layer, partial(loop_forward, layer)],
                            x,
                            device,
                            repeats,
                        )
                        with torch.no_grad():
                            diff = (layer(x).float() - loop_forward(layer, x).float()).abs().max().item()
                        ratio = (smile - base) / (loop - base) if loop > base else float("nan")
                        print(
                            f"| {device} | {str(dtype).removeprefix('torch.')} | {fan_in}->{fan_out} | {experts} | {rank} | {tokens} | "
                            f"{base * 1e3:.2f} | {smile / base:.3f}x | {loop / base:.3f}x | {ratio:.2f} | {diff:.1e} |",
                            flush=True,
                        )
                    del layer
                    if device == "cuda":
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
