"""Convert: run sources -> plan -> factorize -> write for one conversion, with progress and memory."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .factorize import Factorizer, prefetch
from .measure import PeakMemory, format_bytes, now
from .options import Options
from .output import crash_point, open_output
from .plan import Plan, ShardPlan, TensorPlan, make_plan
from .report import describe, non_target_notes
from .tensors import DTYPES, cast
from .write import disk_errors, write_metadata, write_shards


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
    """One status line per event: shard, layer, elapsed time, ETA and memory (RssAnon)."""

    def __init__(self, plan: Plan, memory: PeakMemory, quiet: bool):
        self.plan, self.memory, self.quiet = plan, memory, quiet
        self.total = plan.output_bytes
        self.done = 0
        self.start = now()
        self.shard_index = 0

    def _print(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        self._print(text)

    def layer(self, layer: int) -> None:
        self._print(f"  layer {layer:>3} factored   {self._status()}")

    def shard(self, shard: ShardPlan, kept: bool) -> None:
        self.shard_index += 1
        self.done += shard.size
        verb = "kept (already written)" if kept else "written"
        self._print(f"shard {self.shard_index}/{len(self.plan.shards)} {shard.filename} {verb}   {self._status()}")

    def _status(self) -> str:
        elapsed = now() - self.start
        eta = f"{elapsed * (self.total - self.done) / self.done:5.0f}s" if self.done else "    ?"
        return (
            f"{elapsed:6.1f}s elapsed, ETA {eta}, "
            f"memory {format_bytes(self.memory.current)} (peak {format_bytes(self.memory.peak)})"
        )


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
    and writes nothing.
    """
    options = options or Options()
    out = Path(out)
    with PeakMemory() as memory:
        start = now()
        plan = make_plan(base, experts, options)
        if dry_run:
            print(describe(plan))
            return Result(plan, now() - start, memory.peak, 0, 0)
        crash_point("plan")
        progress = Progress(plan, memory, quiet)
        with disk_errors(out):
            lock, journal = open_output(out, plan, overwrite, progress.note)
        counts = {True: 0, False: 0}

        def on_shard(shard: ShardPlan, kept: bool) -> None:
            counts[kept] += 1
            if kept:
                source.skip(shard)
            progress.shard(shard, kept)

        with lock, disk_errors(out):
            for line in non_target_notes(plan):
                progress.note(line)
            source = TensorSource(plan, progress.layer)
            write_metadata(plan, out, journal)
            crash_point("metadata")
            write_shards(plan, out, journal, source, on_shard)
        seconds = now() - start
    result = Result(plan, seconds, memory.peak, counts[False], counts[True])
    if not quiet:
        print(
            f"done: {out} in {seconds:.1f}s, peak memory {format_bytes(memory.peak)} (RssAnon), "
            f"output {format_bytes(plan.output_bytes)} in {len(plan.shards)} shard(s)",
            file=sys.stderr,
        )
    return result
