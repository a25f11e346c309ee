"""Benchmark the SVD engines on Mistral-7B-shaped weight deltas.

For each (shape, E experts, rank k, device): the batched exact SVD, the batched randomized SVD,
and the baseline: one exact SVD per expert in a loop (what the reference implementation does).
Times are reported as ratios against that baseline, measured in the same run; reconstruction
error as the randomized / exact ratio of relative Frobenius errors at the same rank.

    python tools/bench_svd.py            # full Mistral-7B shapes (slow on CPU; meant for a GPU)
    python tools/bench_svd.py --quick    # shapes / 4, E = 3, k = 64, 128: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time

import torch

from smile_stream.factorize import truncated_svd

MISTRAL_SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096)]


def deltas(experts: int, rows: int, cols: int, device: str, seed: int = 0) -> torch.Tensor:
    """Low-rank-plus-noise deltas, like real fine-tunes: a decaying rank-64 part over a noise floor."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(experts, rows, cols, device=device)
    for i in range(experts):
        left = torch.randn(rows, 64, generator=g) * torch.logspace(0, -1.5, 64)
        low = left @ torch.randn(64, cols, generator=g) / cols**0.5
        out[i] = (low + 0.02 * torch.randn(rows, cols, generator=g) / cols**0.5 * 8).to(device)
    return out


def timed(device: str, fn, *args):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def one_at_a_time(d: torch.Tensor) -> list:
    return [torch.linalg.svd(d[i], full_matrices=False) for i in range(d.shape[0])]


def error(d: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> float:
    down, up = factors
    return float(torch.linalg.norm(d - up @ down) / torch.linalg.norm(d))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shapes / 4, E=3, k in 64,128")
    parser.add_argument("--device", action="append", help="cpu, cuda (default: cpu, plus cuda when present)")
    parser.add_argument("--experts", type=int, action="append", help="E values (default 3 and 8)")
    parser.add_argument("--ranks", type=int, nargs="+", help="k values (default 64 128 256 512)")
    args = parser.parse_args()
    devices = args.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    shapes = [(r // 4, c // 4) for r, c in MISTRAL_SHAPES] if args.quick else MISTRAL_SHAPES
    experts_list = args.experts or ([3] if args.quick else [3, 8])
    ranks = args.ranks or ([64, 128] if args.quick else [64, 128, 256, 512])
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
    )
    header = "| device | shape | E | k | loop exact s | batched exact (speed-up vs loop) | batched randomized (speed-up vs loop) | randomized vs batched exact | error ratio rand/exact |"
    print(header)
    print("|" + "---|" * 9)
    for device in devices:
        for rows, cols in shapes:
            for experts in experts_list:
                d = deltas(experts, rows, cols, device)
                if device.startswith("cuda"):
                    truncated_svd(d[:1, :256, :256], 8, "randomized")  # warm up kernels
                # baseline: one full exact SVD per expert; truncation is free afterwards
                loop, loop_s = timed(device, one_at_a_time, d)
                del loop
                for k in ranks:
                    exact, exact_s = timed(device, truncated_svd, d, k, "exact")
                    rand, rand_s = timed(device, truncated_svd, d, k, "randomized", list(range(experts)))
                    ratio = max(
                        error(d[i], (rand[0][i], rand[1][i])) / error(d[i], (exact[0][i], exact[1][i])) for i in range(experts)
                    )
                    print(
                        f"| {device} | {rows}x{cols} | {experts} | {k} | {loop_s:.2f} | {loop_s / exact_s:.2f}x | "
                        f"{loop_s / rand_s:.2f}x | {exact_s / rand_s:.1f}x | {ratio:.4f} |",
                        flush=True,
                    )
                    del exact, rand
                del d
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
