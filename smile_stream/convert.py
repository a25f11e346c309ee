"""Convert: run sources -> plan -> factorize -> write for one conversion, with progress and memory."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distribute
from .factorize import Factorizer, prefetch
from .measure import PeakMemory, format_bytes, now
from .options import Options
from .output import crash_point, merge_rank_journals, open_output, rank_journals, save_rank_journal
from .plan import Plan, ShardPlan, TensorPlan, make_plan
from .report import describe, non_target_notes
from .tensors import DTYPES, cast
from .write import disk_errors, write_index, write_metadata, write_shards


@dataclass
class Result:
    plan: Plan
    seconds: float
    peak_rss: int
    shards_written: int
    shards_kept: int


class TensorSource:
    """Makes the tensors the writer cannot copy: casts, averages, and expert factors, computing the
    experts of one decoder layer at a time while the next layer's inputs are read ahead."""

    def __init__(self, plan: Plan, on_layer: Callable[[int], None] | None = None):
        self.plan, self.on_layer = plan, on_layer
        self.factorizer = Factorizer(plan)
        self.layers = list(dict.fromkeys(t.layer for s in plan.shards for t in s.tensors if t.module))
        self.cache: dict[int, dict[str, torch.Tensor]] = {}
        # expert tensors still to be served, per layer: a layer's cache entry goes when it reaches 0,
        # including tensors of shards a resumed run keeps (`skip`), which are never asked for
        self.remaining = Counter(t.layer for s in plan.shards for t in s.tensors if t.module)

    def skip(self, shard: ShardPlan) -> None:
        """The writer kept this shard from an earlier run: its expert tensors will not be asked for."""
        for tensor in shard.tensors:
            if tensor.module:
                self._served(tensor)

    def __call__(self, tensor: TensorPlan) -> torch.Tensor:
        dtype = DTYPES[tensor.dtype]
        if tensor.role == "cast":
            return cast(self.plan.base.read(tensor.name), dtype, f"{self.plan.base.folder}: tensor {tensor.name!r}")
        if tensor.role == "average":
            return cast(self.factorizer.average(tensor.name), dtype, f"the average of the full experts' {tensor.name!r}")
        layer = tensor.layer
        if layer not in self.cache:
            self._read_ahead(layer)
            self.cache[layer] = self.factorizer.layer_tensors(layer)
            if self.on_layer:
                self.on_layer(layer)
        result = self.cache[layer][tensor.name]
        self._served(tensor)
        return result

    def _served(self, tensor: TensorPlan) -> None:
        self.remaining[tensor.layer] -= 1
        if tensor.layer in self.cache:
            self.cache[tensor.layer].pop(tensor.name, None)
            if not self.remaining[tensor.layer]:
                del self.cache[tensor.layer]

    def _read_ahead(self, layer: int) -> None:
        position = self.layers.index(layer)
        if position + 1 < len(self.layers):
            upcoming = self.layers[position + 1]
            infos = []
            for module in self.plan.modules.values():
                if module.layer == upcoming:
                    expert_infos = [t for i in module.experts for t in self.plan.experts[i].read_ahead(module.name)]
                    infos += [module.weight, *expert_infos] if expert_infos else []
            if infos:
                prefetch(infos)


class Progress:
    """One status line per event: shard, layer, elapsed time, ETA and memory (RssAnon). In a
    multi-process run rank 0 prints, counting the shards every process has finished (from their
    journal files in `out`)."""

    def __init__(self, plan: Plan, memory: PeakMemory, quiet: bool, out: Path | None = None, world=None):
        self.plan, self.memory, self.quiet, self.out, self.world = plan, memory, quiet, out, world
        self.total = plan.output_bytes
        self.done = 0
        self.start = now()
        self.shard_index = 0
        self.finished: set[str] = set()

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self._print(text)

    def layer(self, layer: int) -> None:
        self._print(f"  layer {layer:>3} factored   {self._status()}")

    def shard(self, shard: ShardPlan, kept: bool) -> None:
        self.finished.add(shard.filename)
        if self.world is not None and self.out is not None and not self.quiet:
            for path in rank_journals(self.out):
                try:
                    self.finished |= set(json.loads(path.read_text())["shards"])
                except (OSError, ValueError, KeyError, TypeError):
                    pass  # being replaced: counted next time
        self.shard_index = len(self.finished)
        self.done = sum(s.size for s in self.plan.shards if s.filename in self.finished)
        verb = "kept (already written)" if kept else "written"
        ranks = f" (all {self.world.size} processes)" if self.world is not None else ""
        self._print(f"shard {self.shard_index}/{len(self.plan.shards)}{ranks} {shard.filename} {verb}   {self._status()}")

    def _status(self) -> str:
        elapsed = now() - self.start
        eta = f"{elapsed * (self.total - self.done) / self.done:5.0f}s" if self.done else "    ?"
        return (
            f"{elapsed:6.1f}s elapsed, ETA {eta}, "
            f"memory {format_bytes(self.memory.current)} (peak {format_bytes(self.memory.peak)})"
        )


def placement_note(placed: dict[str, int], how: str) -> str:
    """One line on how the unchanged base files reached the output."""
    counts = ", ".join(f"{n} by {method}" for method, n in sorted(placed.items()))
    line = f"base files placed whole: {counts}"
    if how == "auto" and "copy" in placed:
        line += " (no hard link or reflink possible: the output is on another filesystem, or it has no links)"
    elif "hard link" in placed:
        line += " (they share their bytes with the base: --base-files copy for an independent folder)"
    return line


def convert(
    base: str,
    experts: list[tuple[str, str]],
    out: str | Path,
    options: Options | None = None,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
) -> Result:
    """Convert a base model and experts (name, folder or hub id) into a SMILE model folder at `out`.

    Resumes an unfinished run with the same inputs and options. With `dry_run`, prints the plan
    and writes nothing. Under `torchrun` (or in an initialised process group) the processes share
    the work: see `distribute`.
    """
    options = options or Options()
    out = Path(out)
    world, started = distribute.join()
    try:
        return _convert(base, experts, out, options, dry_run, overwrite, quiet, world)
    finally:
        distribute.leave(started)


def _convert(base, experts, out: Path, options: Options, dry_run: bool, overwrite: bool, quiet: bool, world) -> Result:
    leader = world is None or world.leader
    with PeakMemory() as memory, ExitStack() as held:
        start = now()
        plan = make_plan(base, experts, options, digest_inputs=leader and not dry_run)
        if world is not None:
            distribute.check_same_plan(world, plan)
            plan.device = distribute.compute_device(world, plan.device)
        if dry_run:
            if leader:
                print(describe(plan))
            return Result(plan, now() - start, memory.peak, 0, 0)
        crash_point("plan")
        progress = Progress(plan, memory, quiet or not leader, out, world)

        def open_folder() -> dict:
            with disk_errors(out):
                lock, journal = open_output(out, plan, overwrite, progress.note)
                held.enter_context(lock)
                for line in non_target_notes(plan):
                    progress.note(line)
                write_metadata(plan, out, journal)
            return journal

        journal = open_folder() if world is None else distribute.from_leader(world, open_folder)
        crash_point("metadata")
        counts = {True: 0, False: 0}
        owned = distribute.mine(world, plan)
        source = TensorSource(plan, progress.layer)
        for shard in plan.shards:
            if shard.filename not in owned:
                source.skip(shard)  # another process writes it

        def on_shard(shard: ShardPlan, kept: bool) -> None:
            counts[kept] += 1
            if kept:
                source.skip(shard)
            progress.shard(shard, kept)

        record = None
        if not leader:
            finished: dict[str, dict] = {}

            def record(name: str, entry: dict) -> None:
                finished[name] = entry
                save_rank_journal(out, world.rank, plan.hash, finished)

        with disk_errors(out):
            placed = write_shards(plan, out, journal, source, on_shard, only=owned, record=record, index=world is None)
            if placed:
                progress.note(placement_note(placed, plan.options.base_files))
            if world is not None:
                progress.note(f"waiting for the other {world.size - 1} process(es) to finish their shards")
                distribute.barrier()  # every process has finished its shards
                if leader:
                    merge_rank_journals(out, journal)
                    write_index(out, plan.shards, {"smile_plan_hash": plan.hash}, crash="index")
                distribute.barrier()  # the index is there when every process returns
        seconds = now() - start
    result = Result(plan, seconds, memory.peak, counts[False], counts[True])
    if not quiet and leader:
        print(
            f"done: {out} in {seconds:.1f}s, peak memory {format_bytes(memory.peak)} (RssAnon), "
            f"output {format_bytes(plan.output_bytes)} in {len(plan.shards)} shard(s)"
            + (f", written by {world.size} processes" if world is not None else ""),
            file=sys.stderr,
        )
    return result
