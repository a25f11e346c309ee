"""Benchmark whole conversions on Mistral-7B-shaped synthetic checkpoints, against copying them.

Each job runs `smile-stream convert` in a subprocess whose peak anonymous RSS (RssAnon: heap, not
mmap'd file pages) is sampled, and is compared with baselines measured in the same run: copying
the base folder (`cp -r`, then `sync`) and reading all inputs once. The page cache is dropped
before every measurement when the system allows it (root), so each one starts cold.

    python tools/bench_convert.py            # reduced: 4-layer base + 3 LoRA; 1-layer base + 3 full experts
    python tools/bench_convert.py --full     # 32-layer base + 3 LoRA; 4-layer base + 3 full experts, randomized and exact
    python tools/bench_convert.py --skip-lora --full-layers 4 --processes 1 2 --max-shard-size 1GB   # torchrun scaling
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from smile_stream.measure import PeakMemory, format_bytes

TOOLS = Path(__file__).resolve().parent


def drop_caches() -> bool:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def make(kind: str, out: Path, *args: str) -> None:
    if not out.exists():
        subprocess.run([sys.executable, str(TOOLS / "make_synthetic_checkpoint.py"), kind, str(out), *args], check=True)


def inputs(work: Path, kind: str, layers: int) -> tuple[Path, list[Path]]:
    """A Mistral-7B-shaped base of `layers` layers and three experts of `kind` (lora or full), made once."""
    base = work / f"mistral-{layers}l"
    make("base", base, "--num-layers", str(layers))
    experts = [work / f"{kind}-{layers}l-{i}" for i in range(3)]
    for i, expert in enumerate(experts):
        make(kind, expert, "--base", str(base), "--seed", str(i + 1))
    return base, experts


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed_copy(base: Path, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(base), str(target)], check=True)
    subprocess.run(["sync"], check=True)
    seconds = time.perf_counter() - start
    shutil.rmtree(target)
    return seconds


def timed_read(folders: list[Path]) -> float:
    drop_caches()
    start = time.perf_counter()
    for folder in folders:
        for path in sorted(folder.rglob("*.safetensors")):
            with open(path, "rb") as f:
                while f.readinto(bytearray(1 << 24)):
                    pass
    return time.perf_counter() - start


def run_conversion(base: Path, experts: list[Path], out: Path, *options: str, processes: int = 1) -> tuple[float, int, int]:
    """(wall seconds, peak RssAnon bytes, output bytes) of one conversion in a subprocess; with
    `processes` > 1 under torchrun (the peak is then the launcher's: not reported)."""
    shutil.rmtree(out, ignore_errors=True)
    drop_caches()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "smile_stream", "convert"]
    command += ["--base", str(base), "--out", str(out), "--quiet", *options]
    for i, expert in enumerate(experts):
        command += ["--expert", f"e{i}={expert}"]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    with PeakMemory(process.pid, interval=0.01) as memory:
        code = process.wait()
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"conversion failed with exit code {code}: {' '.join(command)}")
    shards = sum(p.stat().st_size for p in out.glob("model-*.safetensors"))
    return seconds, memory.peak if processes == 1 else 0, shards


def new_disk(folder: Path) -> int:
    """Bytes of the folder's files that share no storage with another file (not hard links)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.stat().st_nlink == 1)


def expert_bytes(folder: Path) -> int:
    """Bytes of the SMILE expert tensors in a converted folder (from its shard headers)."""
    from smile_stream.modeling_smile import EXPERT_TENSORS
    from smile_stream.tensors import read_safetensors_header

    total = 0
    for shard in folder.glob("model-*.safetensors"):
        for name, info in read_safetensors_header(shard).tensors.items():
            total += info.nbytes if name.rsplit(".", 1)[-1] in EXPERT_TENSORS else 0
    return total


def planned_bytes(base: Path, experts: list[Path], *options: str) -> tuple[int, float]:
    """The plan's predicted shard bytes, and the time the plan (all validation) takes in-process."""
    from smile_stream import Options, make_plan

    settings = Options.from_argv(list(options))
    make_plan(str(base), [(f"e{i}", str(e)) for i, e in enumerate(experts)], settings)  # warm imports
    start = time.perf_counter()
    plan = make_plan(str(base), [(f"e{i}", str(e)) for i, e in enumerate(experts)], settings)
    return plan.output_bytes, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full 7B shape (32 layers; about 45 GB of disk)")
    parser.add_argument("--workdir", type=Path, default=Path("build/bench"))
    parser.add_argument("--lora-layers", type=int, help="decoder layers of the LoRA job's base")
    parser.add_argument("--full-layers", type=int, help="decoder layers of the full-expert job's base")
    parser.add_argument(
        "--svd", nargs="+", help="SVD engines for the full-expert job (default: randomized, plus exact with --full)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-lora", action="store_true")
    parser.add_argument("--skip-full", action="store_true")
    parser.add_argument(
        "--processes", type=int, nargs="+", default=[1], help="full-expert job: process counts to compare (torchrun for > 1)"
    )
    parser.add_argument("--max-shard-size", help="full-expert job: shard size (parallelism is by shard)")
    parser.add_argument(
        "--base-files", nargs="+", default=["auto", "copy"], help="LoRA job: how base files are placed (auto links them)"
    )
    parser.add_argument(
        "--first",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="LoRA job: also time a first conversion of the base, with an empty architecture cache",
    )
    args = parser.parse_args()
    lora_layers = args.lora_layers or (32 if args.full else 4)
    full_layers = args.full_layers or (4 if args.full else 1)
    engines = args.svd or (["randomized", "exact"] if args.full else ["randomized"])
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    os.environ["SMILE_STREAM_CACHE"] = str(work / "architecture-cache")  # this run's, so "first" is honest
    cold = drop_caches()
    print(
        f"{os.cpu_count()} CPUs, page cache {'dropped before each measurement' if cold else 'NOT dropped (needs root): warm-cache figures'}"
    )
    rows = []

    if not args.skip_lora:
        base, loras = inputs(work, "lora", lora_layers)
        copy_s = timed_copy(base, work / "copy")
        read_s = timed_read([base, *loras])
        planned, plan_s = planned_bytes(base, loras)
        # the first conversion of a base builds its architecture with transformers (and caches it)
        first = [("first", args.base_files[0])] if args.first else []
        for when, mode in [*first, *(("again", m) for m in args.base_files)]:
            if when == "first":
                shutil.rmtree(os.environ["SMILE_STREAM_CACHE"], ignore_errors=True)
            wall, peak, written = run_conversion(base, loras, work / "out-lora", "--device", args.device, "--base-files", mode)
            job = f"{lora_layers}-layer base + 3 LoRA r=16, --base-files {mode}" + (
                ", first conversion of this base (architecture not cached)" if when == "first" else ""
            )
            rows.append((job, wall, copy_s, read_s, peak, written, planned, plan_s, folder_bytes(base)))
            disk = new_disk(work / "out-lora")
            experts = expert_bytes(work / "out-lora")
            print(f"  {mode}: new disk {disk:,} bytes = {disk / experts:.3f}x the expert tensors' {experts:,}", flush=True)
            shutil.rmtree(work / "out-lora")

    if not args.skip_full:
        base, fulls = inputs(work, "full", full_layers)
        copy_s = timed_copy(base, work / "copy")
        read_s = timed_read([base, *fulls])
        for engine, processes in ((e, p) for e in engines for p in args.processes):
            options = ("--expert-rank", "128", "--svd", engine)
            if args.max_shard_size:
                options += ("--max-shard-size", args.max_shard_size)
            planned, plan_s = planned_bytes(base, fulls, *options)
            wall, peak, written = run_conversion(
                base, fulls, work / "out-full", *options, "--device", args.device, processes=processes
            )
            launched = f", {processes} processes (torchrun)" if processes > 1 else ""
            rows.append(
                (
                    f"{full_layers}-layer base + 3 full, k=128, {engine}, {args.device}{launched}",
                    wall,
                    copy_s,
                    read_s,
                    peak,
                    written,
                    planned,
                    plan_s,
                    folder_bytes(base),
                )
            )
            print(f"  {engine}: {wall / full_layers:.1f} s per layer", flush=True)
            shutil.rmtree(work / "out-full")

    print()
    print(
        "| job | wall s | / copy (cp -r + sync) | / read inputs once | peak RssAnon | output bytes | = plan | plan s | GB/s out |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for job, wall, copy_s, read_s, peak, written, planned, plan_s, _ in rows:
        print(
            f"| {job} | {wall:.1f} | {wall / copy_s:.2f}x ({copy_s:.1f} s) | {wall / read_s:.2f}x ({read_s:.1f} s) | "
            f"{format_bytes(peak) if peak else '-'} | {written:,} | {'yes' if written == planned else f'NO ({planned:,})'} | {plan_s:.2f} | {written / wall / 1e9:.2f} |"
        )


if __name__ == "__main__":
    main()
