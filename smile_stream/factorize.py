"""Factorize: turn each expert's weight delta into rank-k SMILE factors, one decoder layer at a time.

LoRA experts are factored exactly from their A and B (never the dense delta); full fine-tunes by a
batched truncated SVD (exact or randomized) of W_i - W0 in float32 on the compute device.
"""

from __future__ import annotations

import hashlib
import os
import threading

import torch

from .modeling_smile import low_rank_factors, pack_factors
from .plan import ModulePlan, Plan
from .tensors import DTYPES, TensorInfo, cast

OVERSAMPLES = 16  # extra range-finder columns: max(OVERSAMPLES, rank // 4)
POWER_ITERATIONS = 4


def lora_factors(
    a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float], ranks: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Exact SMILE factors of `scale_i * B_i @ A_i` for several LoRA experts of one module.

    QR(B) = Qb Rb, QR(A^T) = Qa Ra, svd(s Rb Ra^T) = u S v^T, so the delta is (Qb u) S (Qa v)^T:
    cost O((in + out) r^2), no dense (out, in) matrix. Experts of different r are zero-padded to
    the largest r and go through one batched call.
    """
    r = max(x.shape[0] for x in a)
    device = a[0].device
    stacked_a = torch.zeros(len(a), r, a[0].shape[1], device=device)
    stacked_b = torch.zeros(len(b), b[0].shape[0], r, device=device)
    for i, (ai, bi) in enumerate(zip(a, b)):
        stacked_a[i, : ai.shape[0]] = ai.float()
        stacked_b[i, :, : bi.shape[1]] = bi.float()
    qb, rb = torch.linalg.qr(stacked_b)
    qa, ra = torch.linalg.qr(stacked_a.transpose(1, 2))
    scale = torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1)
    u, s, vh = torch.linalg.svd(scale * rb @ ra.transpose(1, 2))
    u, vh = qb @ u, vh @ qa.transpose(1, 2)
    return [low_rank_factors(u[i], s[i], vh[i], k) for i, k in enumerate(ranks)]


def seed_for(*names: str) -> int:
    """A seed derived from tensor and expert names, so reruns draw the same random matrices."""
    return int.from_bytes(hashlib.sha256("\0".join(names).encode()).digest()[:8], "little") & (2**63 - 1)


def truncated_svd(
    deltas: torch.Tensor, rank: int, method: str = "exact", seeds: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SMILE factors (down (B, k, in), up (B, out, k)) of a batch of deltas (B, out, in).

    `randomized` is Halko-Martinsson-Tropp: a Gaussian range finder with `oversamples(rank)` extra
    columns and `POWER_ITERATIONS` QR-stabilised power iterations. Its Gaussian test matrices are
    drawn on the CPU from `seeds` (one per delta), so every device draws the same ones.
    """
    rows, cols = deltas.shape[-2:]
    rank = min(rank, rows, cols)
    if method == "exact":
        u, s, vh = torch.linalg.svd(deltas, full_matrices=False)
        return low_rank_factors(u, s, vh, rank)
    width = min(rank + oversamples(rank), rows, cols)
    tests = []
    for seed in seeds or [0] * deltas.shape[0]:
        generator = torch.Generator().manual_seed(seed)
        tests.append(torch.randn(cols, width, generator=generator))
    q = torch.linalg.qr(deltas @ torch.stack(tests).to(deltas.device)).Q
    for _ in range(POWER_ITERATIONS):
        q = torch.linalg.qr(deltas.transpose(1, 2) @ q).Q
        q = torch.linalg.qr(deltas @ q).Q
    u, s, vh = torch.linalg.svd(q.transpose(1, 2) @ deltas, full_matrices=False)
    return low_rank_factors(q @ u, s, vh, rank)


def oversamples(rank: int) -> int:
    return max(OVERSAMPLES, rank // 4)


def choose_svd(method: str, rank: int, rows: int, cols: int) -> str:
    """`auto`: randomized when the rank (with oversampling) is small against the matrix."""
    if method != "auto":
        return method
    return "randomized" if 4 * (rank + oversamples(rank)) <= min(rows, cols) else "exact"


class Factorizer:
    """Computes the expert tensors of one decoder layer at a time, for the writer to stream out."""

    def __init__(self, plan: Plan, memory_budget: int | None = None):
        self.plan = plan
        self.device = torch.device(plan.device)
        self.budget = memory_budget or (2 << 30 if self.device.type == "cpu" else _device_budget(self.device))
        self.energies: dict[tuple[str, int], float] | None = None  # set while `spectra` runs
        self._by_layer: dict[int, list[ModulePlan]] = {}
        for module in plan.modules.values():
            self._by_layer.setdefault(module.layer, []).append(module)

    def layer_tensors(self, layer: int) -> dict[str, torch.Tensor]:
        """{output tensor name: tensor on the CPU in its output dtype} for every upscaled module of a layer."""
        factors = self.layer_factors(layer)
        out: dict[str, torch.Tensor] = {}
        for module in self._by_layer.get(layer, []):
            out.update(self._assemble(module, [factors[module.name, slot] for slot in range(len(module.experts))]))
        return out

    def layer_factors(self, layer: int) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """{(module, expert slot): (down (k, in), up (out, k))} for every upscaled module of a layer."""
        modules = self._by_layer.get(layer, [])
        factors: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        for module in modules:
            factors.update(self._exact_factors(module))
        factors.update(self._svd_factors([(m, slot) for m in modules for slot in self._slots(m, "svd")]))
        return factors

    def spectra(self) -> dict[str, list[tuple[list[float], float]]]:
        """Per module, per expert slot: the singular values of its delta up to its planned rank
        (largest first: the norms of the `up` columns, as `down` has orthonormal rows) and the
        delta's total energy ||delta||_F^2. LoRA deltas planned at their own r give the whole
        spectrum; for dense deltas the total is the Frobenius norm of the delta itself, so the
        energy beyond the computed rank is exact, not estimated."""
        self.energies = {}
        out: dict[str, list[tuple[list[float], float]]] = {}
        for layer in sorted(self._by_layer):
            for (module, slot), (_, up) in sorted(self.layer_factors(layer).items()):
                values = torch.linalg.vector_norm(up.double(), dim=0)
                total = self.energies.pop((module, slot), None)
                out.setdefault(module, []).append((values.tolist(), float(values.square().sum()) if total is None else total))
        self.energies = None
        return out

    def _slots(self, module: ModulePlan, engine: str) -> list[int]:
        return [slot for slot, i in enumerate(module.experts) if self.plan.experts[i].engine == engine]

    def _exact_factors(self, module: ModulePlan) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        # The experts of a module whose delta comes as LoRA operands go through one batched QR-core call.
        slots = self._slots(module, "qr")
        if not slots:
            return {}
        a, b, scales = zip(*(self.plan.experts[module.experts[slot]].operands(module.name, self.device) for slot in slots))
        results = lora_factors(list(a), list(b), list(scales), [module.ranks[slot] for slot in slots])
        return {(module.name, slot): f for slot, f in zip(slots, results)}

    def _svd_factors(self, jobs: list[tuple[ModulePlan, int]]) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
        # Same-shape, same-rank dense deltas of a layer go through one batched SVD, within the memory budget.
        groups: dict[tuple[int, int, int], list[tuple[ModulePlan, int]]] = {}
        for module, slot in jobs:
            groups.setdefault((module.out_features, module.in_features, module.ranks[slot]), []).append((module, slot))
        results = {}
        for (rows, cols, rank), members in groups.items():
            method = choose_svd(self.plan.options.svd, rank, rows, cols)
            per_delta = rows * cols * 4 * (3 if method == "exact" else 2)
            step = max(1, self.budget // per_delta)
            for start in range(0, len(members), step):
                batch = members[start : start + step]
                deltas = self._deltas(batch, rows, cols)
                if self.energies is not None:
                    for (m, slot), norm in zip(batch, torch.linalg.vector_norm(deltas, dim=(1, 2)).tolist()):
                        self.energies[m.name, slot] = norm * norm
                seeds = [seed_for(m.name, self.plan.experts[m.experts[slot]].name) for m, slot in batch]
                downs, ups = truncated_svd(deltas, rank, method, seeds)
                del deltas
                for j, (m, slot) in enumerate(batch):
                    results[m.name, slot] = (downs[j], ups[j])
        return results

    def _deltas(self, batch: list[tuple[ModulePlan, int]], rows: int, cols: int) -> torch.Tensor:
        # Filled in place (no stack copy); the base weight is read once per module of the batch.
        deltas = torch.empty(len(batch), rows, cols, device=self.device)
        base_name, base = None, None
        for j, (module, slot) in enumerate(batch):
            if module.weight.name != base_name:
                base_name, base = module.weight.name, self.plan.base.read(module.weight.name).to(self.device, torch.float32)
            self.plan.experts[module.experts[slot]].write_delta(module.name, base, deltas[j])
        return deltas

    def _assemble(self, module: ModulePlan, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        dtype = DTYPES[module.dtype]
        bias_deltas = None
        if module.expert_bias:
            base_bias = self.plan.base.read(module.bias.name).float()
            bias_deltas = []
            for i in module.experts:
                delta = self.plan.experts[i].bias_delta(module.name, base_bias)
                bias_deltas.append(torch.zeros_like(base_bias) if delta is None else delta)
        packed = pack_factors(
            [d.cpu() for d, _ in factors], [u.cpu() for _, u in factors], self.plan.options.gate_rank, bias_deltas
        )
        return {
            f"{module.name}.{suffix}": cast(tensor, dtype, f"the expert factors of {module.name}").contiguous()
            for suffix, tensor in packed.items()
        }

    def average(self, name: str) -> torch.Tensor:
        """The mean of a non-target parameter over the full experts (`--non-linear average`)."""
        sources = [source for e in self.plan.experts if (source := e.average_source()) is not None]
        rows = self.plan.base.tensors[name].shape[:1]  # experts that added tokens: the base's rows only
        total = torch.zeros(self.plan.base.tensors[name].shape)
        for source in sources:
            total += source.read(name)[: rows[0]].float() if rows else source.read(name).float()
        return total / len(sources)


def _device_budget(device: torch.device) -> int:
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.6)


def prefetch(infos: list[TensorInfo]) -> threading.Thread:
    """Read the given tensors' bytes into the page cache on a background thread, so that disk reads
    of the next layer overlap with this layer's compute. Uses a small reused buffer: the pages land
    in the page cache, not in this process's anonymous memory."""

    def run() -> None:
        buffer = bytearray(1 << 22)
        view = memoryview(buffer)
        for info in sorted(infos, key=lambda t: (t.file, t.offset)):
            fd = os.open(info.file, os.O_RDONLY)
            try:
                done = 0
                while done < info.nbytes:
                    n = os.preadv(fd, [view[: min(len(buffer), info.nbytes - done)]], info.offset + done)
                    if n <= 0:
                        break
                    done += n
            finally:
                os.close(fd)

    thread = threading.Thread(target=run, name="smile-prefetch", daemon=True)
    thread.start()
    return thread
