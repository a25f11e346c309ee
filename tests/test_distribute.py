"""Shard-parallel conversion under torchrun (gloo, CPU): byte-identical to one process, resumable
across world sizes after a rank is killed, and refused when the ranks plan differently."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smile_stream import Options
from smile_stream.distribute import deal
from smile_stream.plan import make_plan

SHARD = 40_000  # bytes: a few layers per shard of the tiny models, so there is work to deal out


def _experts(models, kind: str) -> list[tuple[str, str]]:
    if kind == "lora":
        return [(f"l{i}", str(models(f"llama:lora_d{i}", r=4 + 2 * i, targets="all-linear", seed=60 + i))) for i in range(3)]
    return [(f"f{i}", str(models(f"llama:full_d{i}", seed=70 + i))) for i in range(2)]


def _torchrun(nproc: int, base, experts, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "smile_stream",
               "convert", "--base", str(base), *(f"--expert={n}={p}" for n, p in experts), "--out", str(out),
               "--gate-rank", "2", "--max-shard-size", str(SHARD), *extra]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _options(**kw) -> Options:
    return Options(gate_rank=2, max_shard_size=SHARD, **kw)


@pytest.mark.parametrize("kind, nproc", [("lora", 2), ("lora", 3), ("full", 2)])
def test_torchrun_writes_the_bytes_of_one_process(models, tmp_path, kind, nproc):
    base, experts = models("llama"), _experts(models, kind)
    plan = make_plan(str(base), experts, _options())
    owners = deal(plan, nproc)
    assert len(plan.shards) >= nproc and set(owners) == set(range(nproc)), "every process gets shards"
    alone = tmp_path / "alone" / "out"  # one process with one thread, as torchrun gives each process
    assert _torchrun(1, base, experts, alone).returncode == 0
    shared = tmp_path / "shared" / "out"
    run = _torchrun(nproc, base, experts, shared)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"written by {nproc} processes" in run.stderr
    assert _files(shared) == _files(alone)  # shards, index, config, remote code, card, journal


def test_a_killed_rank_resumes_with_other_world_sizes(models, tmp_path):
    # 1 process killed after its third shard -> 2 processes, rank 1 killed while committing its
    # second shard -> 1 process finishes; every finished shard is kept, and the bytes are a
    # single uninterrupted run's.
    base, experts = models("llama"), _experts(models, "full")
    alone = tmp_path / "alone" / "out"
    assert _torchrun(1, base, experts, alone).returncode == 0
    out = tmp_path / "run" / "out"
    killed = _torchrun(1, base, experts, out, env={"SMILE_STREAM_CRASH_AT": "shard-3-renamed"})
    assert killed.returncode != 0 and not (out / "model.safetensors.index.json").exists()

    plan = make_plan(str(base), experts, _options())
    pending_of_rank_1 = [i + 1 for i, owner in enumerate(deal(plan, 2)) if owner == 1 and i + 1 > 3]
    second_of_rank_1 = pending_of_rank_1[1]  # commits run in order: the first one is recorded by then
    env = {"SMILE_STREAM_CRASH_AT": f"shard-{second_of_rank_1}-renamed", "SMILE_STREAM_CRASH_RANK": "1"}
    killed = _torchrun(2, base, experts, out, env=env)
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert not (out / "model.safetensors.index.json").exists(), "never finished-looking after a rank died"
    rank_journals = list(out.glob("smile-journal.rank-*.json"))

    finish = _torchrun(1, base, experts, out)
    assert finish.returncode == 0, finish.stderr[-2000:]
    assert finish.stderr.count("kept (already written)") >= 4, "the first run's 3 shards and rank 1's first at least"
    assert not list(out.glob("smile-journal.rank-*.json")) and rank_journals, "rank 1's records were merged"
    assert _files(out) == _files(alone)  # no *.partial left either


def test_ranks_that_plan_differently_are_refused(models, tmp_path):
    base, experts = models("llama"), _experts(models, "lora")
    script = tmp_path / "mismatch.py"
    script.write_text(
        "import os, sys\n"
        "from smile_stream import Options, convert\n"
        "from smile_stream.errors import SmileError\n"
        f"experts = {experts!r}\n"
        "try:\n"
        f"    convert({str(base)!r}, experts, {str(tmp_path / 'out')!r}, Options(gate_rank=2 + int(os.environ['RANK'])), quiet=True)\n"
        "except SmileError as exc:\n"
        f"    open({str(tmp_path)!r} + '/refused-' + os.environ['RANK'], 'w').write(str(exc))\n"
        "    sys.exit(2)\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    for rank in (0, 1):  # each rank says why, in its own file (their printed lines interleave)
        said = (tmp_path / f"refused-{rank}").read_text()
        assert "the 2 processes planned different conversions" in said, run.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing written"
