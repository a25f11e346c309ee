"""Distribute: one conversion shared by the processes of a `torchrun` launch.

`torchrun --nproc-per-node N [--nnodes M ...] -m smile_stream convert ...` starts N processes per
node with the same command; each calls `join` and gets its `World`. They exchange only small
messages over gloo (plan hashes, rank 0's verdict on the output folder, finished shards), so GPUs
serve compute alone: each rank factors on `cuda:LOCAL_RANK`. Every rank makes the same plan and
checks that it agrees with the others; the shards are dealt out by cost (`deal`), whole decoder
layers per shard, so no layer is factored twice; each rank writes its own shards and records them
in its own journal file (`output.save_rank_journal`); rank 0 alone locks the folder, writes the metadata and,
after everyone has finished, merges the records and writes the index. A rank that dies stops the
others (torchrun ends the group; a lost peer times out the final barrier), the folder never looks
finished, and the same command resumes with any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import SmileError
from .plan import Plan

# seconds a rank waits for the others (at the final barrier: one that died and was not stopped by
# its launcher); SMILE_STREAM_TIMEOUT overrides it
DEFAULT_TIMEOUT = 1800


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0


def join() -> tuple[World | None, bool]:
    """This process's place in a multi-process launch (None when it runs alone), and whether this
    call started the process group (then `leave` ends it)."""
    started = False
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return None, False
        timeout = float(os.environ.get("SMILE_STREAM_TIMEOUT", DEFAULT_TIMEOUT))
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout))
        started = True
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))), started


def leave(started: bool) -> None:
    if started and dist.is_initialized():
        dist.destroy_process_group()


def gather(value: object) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def check_same_plan(world: World, plan: Plan) -> None:
    """Refuse to start unless every rank planned the same conversion (inputs, options, layout)."""
    hashes = gather((plan.hash, [s.filename for s in plan.shards], len(plan.shards[0].header) if plan.shards else 0))
    if any(h != hashes[0] for h in hashes):
        differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
        raise SmileError(
            f"the {world.size} processes planned different conversions (ranks {differing} differ from rank 0): every "
            "rank must see the same inputs (a shared filesystem, same paths) and get the same options."
        )


def compute_device(world: World | None, device: str) -> str:
    """Each rank on its own GPU: `cuda` becomes `cuda:LOCAL_RANK`."""
    if world is not None and device == "cuda":
        return f"cuda:{world.local_rank % max(torch.cuda.device_count(), 1)}"
    return device


def from_leader(world: World, work):
    """Run `work()` on rank 0 and hand its result to every rank; an error there is raised on all."""
    result, error = None, None
    if world.leader:
        try:
            result = work()
        except SmileError as exc:
            error = str(exc)
    shared = [(result, error)]
    dist.broadcast_object_list(shared, src=0)
    result, error = shared[0]
    if error is not None:
        raise SmileError(error if world.leader else f"(from rank 0) {error}")
    return result


def deal(plan: Plan, size: int) -> list[int]:
    """The rank that writes each shard. Consecutive shards that share a decoder layer's expert
    tensors (only when one layer outgrows a shard) stay together; each group goes, largest cost
    first, to the rank with the least work so far. Cost: the bytes to write (none for a linked base
    file), plus for every dense delta it factors about 50 byte-copies' worth per weight element (the
    SVD, which dominates for full fine-tunes; LoRA factors cost little next to copying)."""
    groups: list[list[int]] = []
    previous: set[int] = set()
    for index, shard in enumerate(plan.shards):
        layers = {t.layer for t in shard.tensors if t.module}
        if not (layers & previous):
            groups.append([])
        groups[-1].append(index)
        previous = layers
    costs = []
    for members in groups:
        modules = {t.module for i in members for t in plan.shards[i].tensors if t.module}
        # a base file placed whole is a link (nothing to write) unless --base-files copy
        cost = sum(plan.shards[i].size for i in members if plan.shards[i].source is None or plan.options.base_files == "copy")
        for name in modules:
            module = plan.modules[name]
            dense = sum(1 for i in module.experts if plan.experts[i].engine == "svd")
            cost += 50 * 4 * module.in_features * module.out_features * dense
        costs.append(cost)
    owners = [0] * len(plan.shards)
    load = [0] * size
    for group in sorted(range(len(groups)), key=lambda g: (-costs[g], g)):
        rank = min(range(size), key=lambda r: (load[r], r))
        load[rank] += costs[group]
        for index in groups[group]:
            owners[index] = rank
    return owners


def mine(world: World | None, plan: Plan) -> set[str]:
    """The names of the shards this process writes (all of them when it runs alone)."""
    if world is None:
        return {s.filename for s in plan.shards}
    owners = deal(plan, world.size)
    return {s.filename for s, owner in zip(plan.shards, owners) if owner == world.rank}


def barrier() -> None:
    dist.barrier()
