"""SMILE layer and model classes: a sparse mixture of low-rank experts around a base linear.

This one file is the only definition of the SMILE layer. The `smile_stream` package imports it,
and every converted model folder carries a verbatim copy as its remote code, so it imports only
torch and transformers.

For a token x, with experts i = 1..E present at this module:

    l_i = || V_i[:, :g]^T x ||_2               (router logit; g = gate rank)
    p   = softmax(l), keep the top_k largest, renormalise them to sum 1
    y   = W0 x + b0 + sum_{i in top_k} p_i (U_i S_i V_i^T x + db_i)

Routing modes (`config.smile["routing"]`, changeable after loading with `model.set_smile_routing`):
    module    the paper's: each module routes each token on its own logits (the default, and the
              only mode of folders made before modes existed; matches the reference implementation)
    token     each module selects the experts with the largest evidence e_i = l_i / sum_j l_j (the
              module's share for expert i; scale-free, and free to compute) averaged over the
              modules this token has passed so far in the forward pass (itself included)
    sequence  the same evidence summed causally over the sequence's earlier tokens too (padding
              excluded), per sequence: the state of a generation, kept with its KV cache
In the pooled modes the pooled evidence picks the experts and the module's own softmax over l,
renormalised over the picked experts, weights them (exactly 1 for top-1).

Checkpoint layout of one upscaled module `<m>` (base keys stay unchanged):
    <m>.weight       (out, in)      base weight W0
    <m>.bias         (out,)         base bias b0, when the base has one
    <m>.expert_down  (sum k_i, in)  rows: the router section, then the rest (below)
    <m>.expert_up    (sum k_i, out) rows: expert i's (U_i S_i)^T, stacked in expert order
    <m>.expert_bias  (E, out)       bias deltas db_i, only where some expert changes the bias
`expert_down` holds the rows of each V_i^T: first the router section, each expert's first
min(g, k_i) rows in expert order, then each expert's remaining rows in expert order. So the router
is one dense matmul over the leading rows (no extra weights), a routed token's gate values are also
the first part of its expert's down-projection, and every other read is a contiguous block: an
expert's remaining down rows, and its rows of `expert_up`, which only routed tokens read.
Measured on a CPU for one token, this layout halved the layer's overhead over the base linear
compared with per-expert blocks of `expert_down` and an (out, sum k_i) `expert_up`.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

SMILE_FORMAT_VERSION = 2
INDEX_FILE = "model.safetensors.index.json"
EXPERT_TENSORS = ("expert_down", "expert_up", "expert_bias")  # suffixes of an upscaled module's expert tensors
ROUTING_MODES = ("module", "token", "sequence")


def low_rank_factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a (batched) SVD `u diag(s) vh` into SMILE factors `(down, up)` of the given rank.

    `down` = the first `rank` rows of `vh` (orthonormal, unscaled), `up` = `u[..., :rank] * s`.
    Directions whose singular value is numerically zero are set to zero in both factors: the
    SVD picks them arbitrarily, and the router must not score an expert on them.
    """
    s, u, vh = s[..., :rank], u[..., :rank], vh[..., :rank, :]
    eps = torch.finfo(s.dtype).eps * max(u.shape[-2], vh.shape[-1])
    keep = s > eps * s[..., :1].clamp_min(torch.finfo(s.dtype).tiny)
    s = torch.where(keep, s, torch.zeros_like(s))
    return vh * keep.unsqueeze(-1).to(vh.dtype), u * s.unsqueeze(-2)


def expert_rows(ranks: list[int], gate_rank: int) -> list[tuple[slice, slice, slice]]:
    """For each expert, where its rows are: its router rows and its remaining rows in `expert_down`,
    and its rows in `expert_up` (see the layout above)."""
    gates = [min(gate_rank, r) for r in ranks]
    gate_at, rest_at, up_at, rows = 0, sum(gates), 0, []
    for rank, gate in zip(ranks, gates):
        rows.append((slice(gate_at, gate_at + gate), slice(rest_at, rest_at + rank - gate), slice(up_at, up_at + rank)))
        gate_at, rest_at, up_at = gate_at + gate, rest_at + rank - gate, up_at + rank
    return rows


def expert_shapes(in_features: int, out_features: int, ranks: list[int], expert_bias: bool) -> dict[str, tuple[int, ...]]:
    """The expert tensors of one upscaled module, `{suffix: shape}` in their stored order (the layout above)."""
    down, up, bias = EXPERT_TENSORS
    shapes = {down: (sum(ranks), in_features), up: (sum(ranks), out_features)}
    if expert_bias:
        shapes[bias] = (len(ranks), out_features)
    return shapes


def pack_factors(
    downs: list[torch.Tensor], ups: list[torch.Tensor], gate_rank: int, bias_deltas: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Each expert's `down` (k_i, in), `up` (out, k_i) and bias delta -> `{suffix: tensor}` as stored."""
    down, up, bias = EXPERT_TENSORS
    gates = [min(gate_rank, d.shape[0]) for d in downs]
    packed = {
        down: torch.cat([d[:g] for d, g in zip(downs, gates)] + [d[g:] for d, g in zip(downs, gates)]),
        up: torch.cat([u.t() for u in ups]),
    }
    if bias_deltas is not None:
        packed[bias] = torch.stack(list(bias_deltas))
    return packed


def unpack_factors(
    expert_down: torch.Tensor, expert_up: torch.Tensor, ranks: list[int], gate_rank: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The packed factors -> each expert's `(down (k_i, in), up (out, k_i))`, its delta being `up @ down`."""
    return [
        (torch.cat([expert_down[gate], expert_down[rest]]), expert_up[up].t()) for gate, rest, up in expert_rows(ranks, gate_rank)
    ]


class RoutingState:
    """Evidence pooled across the SMILE modules of one model ("token" and "sequence" routing).

    Per forward pass: `running`, each token's evidence summed over the modules it has passed, and
    `presence`, how many of those modules hold each expert (the average is taken over them). For
    "sequence" also `history`: per module turn, the evidence of the sequence's tokens of earlier
    forward passes at that turn, (batch, E), which travels with the KV cache (reordered with it in
    beam search), so decoding token by token routes exactly as one pass over the whole sequence.
    One token of one sequence (CPU decoding) takes `pooled_one`: the same sums in Python floats,
    since a handful of tensor ops per module would cost more than the whole routing arithmetic.
    """

    def __init__(self, mode: str, num_experts: int):
        self.mode, self.num_experts = mode, num_experts
        self._index: dict[tuple, torch.Tensor] = {}  # each module's experts as an index tensor, per device
        self.begin(None, None, None)

    def begin(self, shape: tuple[int, int] | None, mask: torch.Tensor | None, history: dict | None) -> None:
        """A new forward pass over (batch, tokens) with its padding mask, continuing `history` or not."""
        self.shape, self.history = shape, {} if history is None else history
        self.mask = mask if mask is not None and not bool(mask.all()) else None  # None: no padding
        self.running, self.running_one = None, [0.0] * self.num_experts
        self.presence = [0] * self.num_experts
        self.real_one = self.mask is None or bool(self.mask.reshape(-1)[-1])
        self.turn = 0

    @torch.no_grad()
    def pooled(self, experts: list[int], logits: torch.Tensor) -> torch.Tensor:
        """This module's router logits (tokens, E_m) for its experts (global indices) -> pooled
        scores, used only to pick experts (so a scale shared by all of them is left out)."""
        n, device = logits.shape[0], logits.device
        if self.running is None or self.running.shape[0] != n:
            self.running = torch.zeros(n, self.num_experts, dtype=torch.float64, device=device)
        everyone = len(experts) == self.num_experts  # experts are listed in order: no indexing
        ids = None if everyone else self._ids(experts)
        logits = logits.to(self.running.device, torch.float64)
        total = logits.sum(-1, keepdim=True).clamp_min_(1e-30)  # the evidence: each expert's share
        if everyone:
            self.running.addcdiv_(logits, total)
        else:
            self.running.index_add_(1, ids, logits / total)
        for i in experts:
            self.presence[i] += 1
        scores = self.running
        if self.mode == "sequence":
            batch = self.shape[0] if self.shape and self.shape[0] * self.shape[1] == n else 1
            # (batch, tokens per sequence, E); decoding (one token per sequence) stays 2-D: no reshapes
            scores = self.running.view(batch, n // batch, -1) if n != batch else self.running
            if self.mask is not None and self.mask.shape == (batch, n // batch):
                scores = scores * self.mask.to(scores.device, scores.dtype).view(*scores.shape[:-1], 1)
            if n != batch:
                scores = scores.cumsum(1)
            earlier = self.history.get(self.turn)
            if earlier is not None:
                if not torch.is_tensor(earlier):  # left by `pooled_one`
                    earlier = torch.tensor(earlier, dtype=scores.dtype)
                earlier = earlier.to(scores.device)
                scores = scores + (earlier.view(batch, -1) if n == batch else earlier.view(batch, 1, -1))
            elif scores is self.running:  # the history keeps this turn's sums, not the later modules' additions
                scores = scores.clone()
            self.history[self.turn] = scores[:, -1] if n != batch else scores
            self.turn += 1
            scores = scores.view(n, -1)
        if not everyone:
            scores = scores.index_select(1, ids)
        counts = [self.presence[i] for i in experts]
        if min(counts) != max(counts):  # the average over the modules holding each expert
            scores = scores / torch.tensor(counts, dtype=scores.dtype, device=scores.device)
        return scores.to(device)

    def _ids(self, experts: list[int]) -> torch.Tensor:
        key = (tuple(experts), self.running.device)
        if key not in self._index:
            self._index[key] = torch.tensor(experts, device=self.running.device)
        return self._index[key]

    def pooled_one(self, experts: list[int], evidence: list[float]) -> list[float]:
        """`pooled` for one token of one sequence, in Python floats."""
        running, presence = self.running_one, self.presence
        for i, value in zip(experts, evidence):
            running[i] += value
            presence[i] += 1
        if self.mode == "sequence":
            earlier = self.history.get(self.turn)
            earlier = earlier.reshape(-1).tolist() if torch.is_tensor(earlier) else earlier or [0.0] * len(running)
            running = [h + r for h, r in zip(earlier, running)] if self.real_one else earlier
            self.history[self.turn] = running
            self.turn += 1
        return [running[i] / presence[i] for i in experts]


class SmileLinear(nn.Module):
    """A linear layer `W0 x + b0` plus a routed sparse mixture of low-rank experts.

    `ranks[i]` is expert i's rank k_i; experts may have different ranks. Experts whose rank is
    below `gate_rank` are routed on their k_i directions (as if padded with zero rows).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ranks: list[int],
        gate_rank: int,
        top_k: int,
        bias: bool = True,
        expert_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not ranks or min(ranks) < 1:
            raise ValueError(f"SmileLinear needs at least one expert of rank >= 1, got ranks {ranks}")
        if gate_rank < 1 or top_k < 1:
            raise ValueError(f"gate_rank and top_k must be >= 1, got {gate_rank} and {top_k}")
        self.in_features, self.out_features = in_features, out_features
        self.ranks = [int(r) for r in ranks]
        self.gate_rank = int(gate_rank)
        self.top_k = min(int(top_k), len(self.ranks))
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.expert_bias = None
        for suffix, shape in expert_shapes(in_features, out_features, self.ranks, expert_bias).items():
            setattr(self, suffix, nn.Parameter(torch.empty(shape, **factory)))
        self._rows = expert_rows(self.ranks, self.gate_rank)
        self._gate_size = sum(gate.stop - gate.start for gate, _, _ in self._rows)
        # Same-rank experts (k >= g) allow reshaped views, and with them the gather-based sparse
        # path that has no host synchronisation.

        self._uniform = len(set(self.ranks)) == 1 and self.ranks[0] >= self.gate_rank
        # Computing every expert costs sum k_i (in + out) flops per token more than the routed ones;
        # below ~256k (small models, small ranks) one dense matmul beats the grouped path's dozen
        # small ops (measured on 576-1536 wide layers: 1.3-2x less overhead at 50 and 512 tokens).
        self._grouping_pays = sum(self.ranks) * (in_features + out_features) > 256_000
        # pooled routing: the model's shared state, and this module's experts as global indices
        self.routing: RoutingState | None = None
        self.expert_ids = list(range(len(self.ranks)))
        # a list while something records the routing (`smile_stream.route`): each call appends its
        # tokens' dense routing weights (tokens, E) over this module's experts
        self.trace: list[torch.Tensor] | None = None

    @property
    def num_experts(self) -> int:
        return len(self.ranks)

    @classmethod
    def from_factors(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        downs: list[torch.Tensor],
        ups: list[torch.Tensor],
        gate_rank: int,
        top_k: int,
        bias_deltas: list[torch.Tensor] | None = None,
    ) -> SmileLinear:
        """Build a layer from the base weight/bias and each expert's `down` (k_i, in) and `up` (out, k_i)."""
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            [d.shape[0] for d in downs],
            gate_rank,
            top_k,
            bias=bias is not None,
            expert_bias=bias_deltas is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
            for suffix, tensor in pack_factors(list(downs), list(ups), gate_rank, bias_deltas).items():
                getattr(layer, suffix).copy_(tensor)
        return layer

    @classmethod
    def from_linears(cls, base: nn.Linear, experts: list[nn.Linear], gate_rank: int, expert_rank: int, top_k: int) -> SmileLinear:
        """Upscale a base `nn.Linear` with fine-tuned copies of it (exact truncated SVD of each delta)."""
        w0 = base.weight.detach().float()
        downs, ups, bias_deltas = [], [], []
        for expert in experts:
            u, s, vh = torch.linalg.svd(expert.weight.detach().float() - w0, full_matrices=False)
            down, up = low_rank_factors(u, s, vh, min(expert_rank, s.shape[-1]))
            downs.append(down.to(base.weight.dtype))
            ups.append(up.to(base.weight.dtype))
            if base.bias is not None and expert.bias is not None:
                bias_deltas.append(expert.bias.detach() - base.bias.detach())
        changed = any(bool(d.any()) for d in bias_deltas)
        return cls.from_factors(
            base.weight.detach(),
            None if base.bias is None else base.bias.detach(),
            downs,
            ups,
            gate_rank,
            top_k,
            bias_deltas if changed else None,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
            f"gate_rank={self.gate_rank}, top_k={self.top_k}"
        )

    def routing_weights(self, logits: torch.Tensor, pool: bool = False) -> torch.Tensor:
        """Router logits (tokens, E) -> dense routing weights (tokens, E), zero outside the top_k."""
        logits = logits.float()
        if self.top_k == self.num_experts and self.routing is None:
            weights = torch.softmax(logits, dim=-1)
            if self.trace is not None:
                self.trace.append(weights.detach().cpu())
            return weights
        top, index = self._top(logits, pool)
        return torch.zeros_like(logits).scatter_(-1, index, top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One token on the CPU without autograd (decoding): the few-op path of
        # `_decode_pack`. The checks are ordered cheapest first: they run 210 times per token.
        if x.numel() == self.in_features and not torch.is_grad_enabled() and x.is_cpu and not torch.compiler.is_compiling():
            pack, down = self.__dict__.get("_pack"), self._parameters["expert_down"]
            if pack is None or pack[0] != (down.data_ptr(), down._version):
                pack = self._decode_pack()
            if pack is not None:
                return self._decode_one(x, pack)
        y = F.linear(x, self.weight, self.bias)
        tokens, out = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        if self._uniform and tokens.shape[0] * self.top_k < self.num_experts:
            self._add_sparse(tokens, out)
        elif x.is_cpu and self.top_k < self.num_experts and self._grouping_pays and not torch.compiler.is_compiling():
            self._add_grouped(tokens, out)
        else:
            self._add_dense(tokens, out)
        return y

    def _logits(self, gate: torch.Tensor) -> torch.Tensor:
        """The router section's values (tokens, sum_i min(g, k_i)) -> router logits (tokens, E)."""
        if self._gate_size == self.num_experts * self.gate_rank:
            return gate.view(-1, self.num_experts, self.gate_rank).float().norm(dim=-1)
        return torch.stack([gate[:, rows].float().norm(dim=-1) for rows, _, _ in self._rows], -1)

    def _top(self, logits: torch.Tensor, pool: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits (tokens, E) -> the renormalised top-k weights and expert indices (tokens, top_k).
        With `pool` (the forward paths; once per module and pass) and a pooled routing mode, the
        pooled evidence picks the experts."""
        chooser = self._chooser(logits) if pool else logits
        if self.top_k == 1:  # the renormalised weight of a single choice is exactly 1
            index = chooser.argmax(dim=-1, keepdim=True)
            return self._traced(torch.ones(index.shape, dtype=logits.dtype, device=logits.device), index)
        if chooser is logits:
            top, index = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        else:
            index = chooser.topk(self.top_k, dim=-1).indices
            top = torch.softmax(logits, dim=-1).gather(-1, index)
        return self._traced(top / top.sum(-1, keepdim=True), index)

    def _chooser(self, logits: torch.Tensor) -> torch.Tensor:
        """What picks the experts in a forward pass: the pooled evidence in a pooled mode, else the logits."""
        return logits if self.routing is None else self.routing.pooled(self.expert_ids, logits)

    def _traced(self, top: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trace is not None:
            self.trace.append(torch.zeros(index.shape[0], self.num_experts).scatter_(-1, index.cpu(), top.detach().float().cpu()))
        return top, index

    def _route_one(self, logits: list[float]) -> list[tuple[int, float]]:
        """One token's router logits -> its (expert, weight) pairs, computed in Python: on a CPU,
        right after the base matmul has streamed the weight through the caches, every extra tensor
        op costs several microseconds, more than this arithmetic on E numbers."""
        chooser = logits
        if self.routing is not None:
            total = sum(logits) or 1e-30
            chooser = self.routing.pooled_one(self.expert_ids, [value / total for value in logits])
        if self.top_k == 1:
            choices = [(max(range(len(chooser)), key=chooser.__getitem__), 1.0)]
        else:
            chosen = sorted(range(len(chooser)), key=lambda i: -chooser[i])[: self.top_k]
            best = max(logits[i] for i in chosen)
            scores = [math.exp(logits[i] - best) for i in chosen]
            choices = [(i, score / sum(scores)) for i, score in zip(chosen, scores)]
        if self.trace is not None:
            row = [0.0] * len(logits)
            for i, weight in choices:
                row[i] = weight
            self.trace.append(torch.tensor([row]))
        return choices

    def _decode_pack(self) -> tuple | None:
        """The single-token CPU layout of the experts, built on first use and again whenever
        `expert_down` is replaced, moved or edited in place.

        One token of one sequence is memory-bound, and every tensor op beside the base GEMV costs
        several microseconds (more than its bytes), so the layer does three more: one GEMV over a
        copy of every expert's down rows laid out expert by expert (router rows first, sum k_i
        rows: small next to W0), one transfer of those values to Python for routing, and one addmm
        per routed expert with its contiguous rows of `expert_up`. W0 is left as loaded (no second
        copy, and memory-mapped weights stay mapped). Not built for modules whose weights
        accelerate offloads (they move each call).
        """
        down, up = self.expert_down, self.expert_up
        hook = getattr(self, "_hf_hook", None)
        if down.device.type != "cpu" or getattr(hook, "offload", False):
            return None
        blocks, gates, experts, start = [], [], [], 0
        for gate_rows, rest_rows, up_rows in self._rows:
            blocks += [down.detach()[gate_rows], down.detach()[rest_rows]]
            rank = up_rows.stop - up_rows.start
            gates.append((start, start + gate_rows.stop - gate_rows.start))
            experts.append((start, start + rank, up.detach()[up_rows]))
            start += rank
        pack = ((down.data_ptr(), down._version), torch.cat(blocks), gates, experts)
        self.__dict__["_pack"] = pack
        return pack

    def _decode_one(self, x: torch.Tensor, pack: tuple) -> torch.Tensor:
        _, downs, gates, experts = pack
        y = F.linear(x, self.weight, self.bias)
        h = F.linear(x, downs).view(-1)
        values = h.tolist()
        out = y.view(1, -1)
        for expert, weight in self._route_one([math.hypot(*values[first:last]) for first, last in gates]):
            start, stop, up = experts[expert]
            out.addmm_(h[start:stop].view(1, -1), up, alpha=weight)
            if self.expert_bias is not None:
                out.add_(self.expert_bias[expert], alpha=weight)
        return y

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, torch.Tensor) or name in self.__dict__.get("_parameters", ()):
            self.__dict__.pop("_pack", None)  # a parameter replaced
        super().__setattr__(name, value)

    def _add_grouped(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        # Prefill on the CPU, top_k < E: route first, then per expert two small matmuls over the
        # tokens routed to it (sorted by expert), so each token only pays for its own experts.
        gate = F.linear(tokens, self.expert_down[: self._gate_size])
        top, index = self._top(self._logits(gate), pool=True)
        experts = index.reshape(-1)
        order = torch.argsort(experts, stable=True)
        rows = order // self.top_k  # the token of each (token, choice) pair, grouped by expert
        weights = top.reshape(-1)[order].unsqueeze(1).to(tokens.dtype)
        start = 0
        for expert, count in enumerate(torch.bincount(experts, minlength=self.num_experts).tolist()):
            if not count:
                continue
            part, (gate_rows, rest_rows, up_rows) = rows[start : start + count], self._rows[expert]
            h = gate.index_select(0, part)[:, gate_rows]
            if rest_rows.stop > rest_rows.start:
                h = torch.cat([h, F.linear(tokens.index_select(0, part), self.expert_down[rest_rows])], 1)
            out.index_add_(0, part, h.mul_(weights[start : start + count]) @ self.expert_up[up_rows])
            start += count
        if self.expert_bias is not None:
            dense = torch.zeros(index.shape[0], self.num_experts, dtype=top.dtype).scatter_(-1, index, top)
            out.addmm_(dense.to(out.dtype), self.expert_bias)

    def _add_dense(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        # Prefill elsewhere: every expert's down-projection in one matmul, whose router section
        # gives the logits; reordered to the experts' order and scaled by the routing weights,
        # one matmul adds all experts.
        h = F.linear(tokens, self.expert_down)
        logits = self._logits(h[:, : self._gate_size])
        order, owner = self._dense_order(h.device)
        if self.top_k == 1 and self.trace is None:  # one expert at weight 1 per token: a mask of its columns
            chosen = self._chooser(logits).argmax(dim=-1, keepdim=True)
            out.addmm_(h.index_select(1, order).mul_(owner == chosen), self.expert_up)
            if self.expert_bias is not None:
                out.add_(self.expert_bias.index_select(0, chosen.view(-1)))
            return
        weights = self.routing_weights(logits, pool=True).to(h.dtype)
        out.addmm_(h.index_select(1, order).mul_(weights.index_select(1, owner)), self.expert_up)
        if self.expert_bias is not None:
            out.addmm_(weights, self.expert_bias)

    def _dense_order(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Index tensors (cached per device): the columns of `expert_down`'s output in expert order
        (each expert's gate rows, then its remaining rows), and the expert owning each of them."""
        cached = self.__dict__.setdefault("_orders", {})
        if device not in cached:
            order = [row for gate, rest, _ in self._rows for rows in (gate, rest) for row in range(rows.start, rows.stop)]
            owner = [i for i, rank in enumerate(self.ranks) for _ in range(rank)]
            cached[device] = (torch.tensor(order, device=device), torch.tensor(owner, device=device))
        return cached[device]

    def _add_sparse(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        # Decoding elsewhere (same-rank experts): gathers of the selected experts' blocks keep this
        # free of host synchronisation, for CUDA graphs and torch.compile.
        n, e, g, k = tokens.shape[0], self.num_experts, self.gate_rank, self.ranks[0]
        gate = F.linear(tokens, self.expert_down[: e * g])
        top, index = self._top(self._logits(gate), pool=True)
        flat = index.reshape(-1)
        rest = self.expert_down[e * g :].view(e, k - g, self.in_features)[flat].view(n, self.top_k, k - g, -1)
        h = torch.cat(
            [gate.view(n, e, g).gather(1, index.unsqueeze(-1).expand(-1, -1, g)), torch.einsum("tjri,ti->tjr", rest, tokens)],
            -1,
        )
        up = self.expert_up.view(e, k, self.out_features)[flat].view(n, self.top_k, k, -1)
        out.add_(torch.einsum("tjko,tjk->to", up, h * top.unsqueeze(-1).to(h.dtype)))
        if self.expert_bias is not None:
            dense = torch.zeros(n, e, dtype=top.dtype, device=top.device).scatter_(-1, index, top)
            out.addmm_(dense.to(out.dtype), self.expert_bias)


def check_format(smile: dict) -> None:
    """Refuse a `config.smile` written for another packing of the expert factors."""
    found = smile.get("format_version")
    if found != SMILE_FORMAT_VERSION:
        raise ValueError(
            f"this folder holds SMILE format {found}, and this code reads format {SMILE_FORMAT_VERSION}. "
            "Load it with the remote code saved in the folder (trust_remote_code=True), or convert it "
            "again with this version of smile-stream."
        )


def upscale_modules(model: nn.Module, smile: dict) -> None:
    """Replace each module named in `smile["modules"]` by an (uninitialised) SmileLinear of the same
    shape, and set up the routing mode the folder asks for."""
    check_format(smile)
    names = [e["name"] for e in smile["experts"]]
    # The module names are the causal LM's; the backbone alone (AutoModel) lacks their first part.
    backbone = getattr(model, "base_model", model) is model and bool(getattr(model, "base_model_prefix", ""))
    for name, spec in smile["modules"].items():
        if backbone and name.startswith(model.base_model_prefix + "."):
            name = name[len(model.base_model_prefix) + 1 :]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        layer = SmileLinear(
            old.in_features,
            old.out_features,
            spec["ranks"],
            smile["gate_rank"],
            smile["top_k"],
            bias=old.bias is not None,
            expert_bias=bool(spec.get("expert_bias")),
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        layer.expert_ids = [names.index(e) for e in spec["experts"]]
        setattr(parent, child, layer)
    set_routing(model, smile.get("routing", "module"), len(names))


def set_routing(model: nn.Module, mode: str, num_experts: int) -> RoutingState | None:
    """Give every SmileLinear of `model` one shared RoutingState for `mode` (None for "module")."""
    if mode not in ROUTING_MODES:
        raise ValueError(f"routing mode {mode!r}: choose one of {', '.join(ROUTING_MODES)}")
    state = RoutingState(mode, num_experts) if mode != "module" else None
    for module in model.modules():
        if isinstance(module, SmileLinear):
            module.routing = state
    model._smile_routing = state
    return state


def _begin_forward(state: RoutingState, args: tuple, kwargs: dict) -> None:
    ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    shape = tuple((ids if ids is not None else embeds).shape[:2]) if ids is not None or embeds is not None else None
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    if mask is not None and (mask.dim() != 2 or shape is None):
        mask = None
    elif mask is not None:
        mask = mask[:, -shape[1] :]
    cache = _cache_in(kwargs)
    continuing = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0
    state.begin(shape, mask, getattr(cache, "_smile_history", None) if continuing else None)


def _cache_in(mapping) -> object:
    # transformers 5 names the KV cache `cache`; 4.x and early 5.x `past_key_values`
    for name in ("cache", "past_key_values"):
        if mapping.get(name) is not None:
            return mapping[name]
    return None


def _keep_history(state: RoutingState, cache: object) -> None:
    # The sequence's evidence travels with its KV cache: reordered with it for beam search.
    if state.mode != "sequence" or cache is None or not hasattr(cache, "reorder_cache"):
        return
    cache._smile_history = state.history
    if not getattr(cache, "_smile_reorders", False):
        reorder = cache.reorder_cache

        def reorder_with_history(beam_idx: torch.Tensor) -> None:
            reorder(beam_idx)
            history = cache._smile_history
            for turn, evidence in history.items():
                evidence = torch.as_tensor(evidence, dtype=torch.float64)
                evidence = evidence.unsqueeze(0) if evidence.dim() == 1 else evidence  # one sequence's, as floats
                history[turn] = evidence.index_select(0, beam_idx.to(evidence.device))

        cache.reorder_cache = reorder_with_history
        cache._smile_reorders = True


def check_complete(folder: str | os.PathLike) -> None:
    """Refuse a folder whose conversion did not finish (no index yet, or half-written shards)."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return
    partial = sorted(f for f in os.listdir(folder) if f.endswith(".partial"))
    if partial or not os.path.exists(os.path.join(folder, INDEX_FILE)):
        found = f"half-written shards {partial}" if partial else f"no {INDEX_FILE}"
        raise OSError(
            f"{folder} holds an unfinished SMILE conversion ({found}). Re-run the same "
            "`smile-stream convert ...` command to resume it; finished shards are kept."
        )


_MODEL_CLASSES: dict[type, type] = {}


def smile_model_class(base_class: type) -> type:
    """The SMILE version of a transformers model class: same modules, with the linears named in
    `config.smile` upscaled. It keeps the base class's config class, so the Auto classes accept it."""
    if base_class not in _MODEL_CLASSES:

        def __init__(self, config, *args, **kwargs):
            base_class.__init__(self, config, *args, **kwargs)
            upscale_modules(self, config.smile)

        @classmethod
        def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
            check_complete(pretrained_model_name_or_path)
            return base_class.from_pretrained.__func__(cls, pretrained_model_name_or_path, *args, **kwargs)

        @functools.wraps(base_class.forward)  # generate() reads the signature to choose its inputs
        def forward(self, *args, **kwargs):
            state = self._smile_routing
            if state is None:
                return base_class.forward(self, *args, **kwargs)
            _begin_forward(state, args, kwargs)
            output = base_class.forward(self, *args, **kwargs)
            _keep_history(state, _cache_in(output) if hasattr(output, "get") else None)
            return output

        def set_smile_routing(self, mode: str) -> None:
            """Switch the routing mode ("module", "token" or "sequence") of this loaded model."""
            set_routing(self, mode, len(self.config.smile["experts"]))
            self.config.smile["routing"] = mode

        name = "Smile" + base_class.__name__
        namespace = {
            "__init__": __init__,
            "from_pretrained": from_pretrained,
            "forward": forward,
            "set_smile_routing": set_smile_routing,
            "__module__": __name__,
        }
        _MODEL_CLASSES[base_class] = type(name, (base_class,), namespace)
    return _MODEL_CLASSES[base_class]


def __getattr__(name: str) -> type:
    # transformers resolves `auto_map` entries like "modeling_smile.SmileLlamaForCausalLM" with
    # getattr on this module; build the class for the named transformers architecture on demand.
    # transformers is imported here, not at the top: the converter imports this file and never needs it.
    if name.startswith("Smile"):
        import transformers

        base = getattr(transformers, name[len("Smile") :], None)
        if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
            return smile_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
