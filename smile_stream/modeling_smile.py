"""SMILE layer and model classes: a sparse mixture of low-rank experts around a base linear.

This one file is the only definition of the SMILE layer. The `smile_stream` package imports it,
and every converted model folder carries a verbatim copy as its remote code, so it imports only
torch and transformers.

For a token x, with experts i = 1..E present at this module:

    l_i = || V_i[:, :g]^T x ||_2               (router logit; g = gate rank)
    p   = softmax(l), keep the top_k largest, renormalise them to sum 1
    y   = W0 x + b0 + sum_{i in top_k} p_i (U_i S_i V_i^T x + db_i)

Checkpoint layout of one upscaled module `<m>` (base keys stay unchanged):
    <m>.weight       (out, in)      base weight W0
    <m>.bias         (out,)         base bias b0, when the base has one
    <m>.expert_down  (sum k_i, in)  rows: each expert's V_i^T, stacked in expert order
    <m>.expert_up    (sum k_i, out) rows: each expert's (U_i S_i)^T, stacked in expert order
    <m>.expert_bias  (E, out)       bias deltas db_i, only where some expert changes the bias
The router reads the first g rows of each expert's block of `expert_down`: no extra weights.
Both factors keep each expert's block contiguous (rows), so decoding reads a selected expert's
factors as two dense blocks; an (out, sum k_i) up-projection would scatter them over `out` rows
and measured 3x slower to read for one token on a CPU.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import transformers
from torch import nn

SMILE_FORMAT_VERSION = 1
INDEX_FILE = "model.safetensors.index.json"


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
        total = sum(self.ranks)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.expert_down = nn.Parameter(torch.empty(total, in_features, **factory))
        self.expert_up = nn.Parameter(torch.empty(total, out_features, **factory))
        self.expert_bias = nn.Parameter(torch.empty(len(self.ranks), out_features, **factory)) if expert_bias else None
        # Same-rank experts allow reshaped views instead of per-expert slices, and a sparse
        # path that gathers only the selected experts' rows.
        self._uniform = len(set(self.ranks)) == 1 and self.ranks[0] >= self.gate_rank

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
            layer.expert_down.copy_(torch.cat(list(downs), 0))
            layer.expert_up.copy_(torch.cat([up.t() for up in ups], 0))
            if bias_deltas is not None:
                layer.expert_bias.copy_(torch.stack(list(bias_deltas)))
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

    def routing_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Router logits (tokens, E) -> dense routing weights (tokens, E), zero outside the top_k."""
        probs = torch.softmax(logits.float(), dim=-1)
        if self.top_k == self.num_experts:
            return probs
        top, index = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, index, top / top.sum(-1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        tokens, out = x.reshape(-1, self.in_features), y.view(-1, self.out_features)
        if self._uniform and tokens.shape[0] * self.top_k < self.num_experts:
            self._add_sparse(tokens, out)
        elif self._uniform and self.top_k < self.num_experts and x.device.type == "cpu" and not torch.compiler.is_compiling():
            self._add_grouped(tokens, out)
        else:
            self._add_dense(tokens, out)
        return y

    def _gate(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router on the g gate rows of each expert (same-rank experts): logits (n, E), and the
        renormalised top-k weights and expert indices (n, top_k)."""
        down = self.expert_down.view(self.num_experts, self.ranks[0], self.in_features)
        logits = torch.matmul(down[:, : self.gate_rank, :], tokens.t()).float().norm(dim=1).t()
        if self.top_k == 1:  # the renormalised weight of a single choice is exactly 1
            index = logits.argmax(dim=-1, keepdim=True)
            return logits, torch.ones(index.shape, dtype=logits.dtype, device=logits.device), index
        top, index = torch.softmax(logits, dim=-1).topk(self.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), index

    def _add_grouped(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        # Prefill on the CPU, top_k < E: route first, then one pair of matmuls per expert over the
        # tokens routed to it (sorted by expert), so each token only pays for its own experts.
        k = self.ranks[0]
        down = self.expert_down.view(self.num_experts, k, self.in_features)
        up = self.expert_up.view(self.num_experts, k, self.out_features)
        logits, top, index = self._gate(tokens)
        experts = index.reshape(-1)
        order = torch.argsort(experts, stable=True)
        rows = order // self.top_k  # the token of each (token, choice) pair, grouped by expert
        inputs, weights = tokens.index_select(0, rows), top.reshape(-1)[order].unsqueeze(1).to(tokens.dtype)
        start = 0
        for expert, count in enumerate(torch.bincount(experts, minlength=self.num_experts).tolist()):
            if count:
                part = slice(start, start + count)
                h = F.linear(inputs[part], down[expert]).mul_(weights[part])
                out.index_add_(0, rows[part], h @ up[expert])
                start += count
        if self.expert_bias is not None:
            out.addmm_(torch.zeros_like(logits).scatter(-1, index, top).to(out.dtype), self.expert_bias)

    def _add_dense(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        # Prefill: every expert's down-projection in one matmul, whose first g rows per expert are
        # the router; the routing weights scale those columns; one matmul adds all experts to `out`.
        h = F.linear(tokens, self.expert_down)
        n, g = h.shape[0], self.gate_rank
        if self._uniform:
            blocks = h.view(n, self.num_experts, self.ranks[0])
            weights = self.routing_weights(blocks[..., :g].float().norm(dim=-1))
            h = (blocks * weights.unsqueeze(-1).to(h.dtype)).view(n, -1)
        else:
            parts = h.split(self.ranks, dim=-1)
            weights = self.routing_weights(torch.stack([p[:, :g].float().norm(dim=-1) for p in parts], -1))
            h = torch.cat([p * weights[:, i : i + 1].to(h.dtype) for i, p in enumerate(parts)], -1)
        out.addmm_(h, self.expert_up)
        if self.expert_bias is not None:
            out.addmm_(weights.to(out.dtype), self.expert_bias)

    def _add_sparse(self, tokens: torch.Tensor, out: torch.Tensor) -> None:
        # Decoding: read the g gate rows of every expert, then only the selected experts' factors.
        k, n = self.ranks[0], tokens.shape[0]
        down = self.expert_down.view(self.num_experts, k, self.in_features)
        up = self.expert_up.view(self.num_experts, k, self.out_features)
        logits, top, index = self._gate(tokens)
        if n == 1 and tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            # One token on the CPU: use the selected experts' blocks in place, no weights copied.
            for weight, expert in zip(top[0].tolist(), index[0].tolist()):
                out.addmm_(F.linear(tokens, down[expert]), up[expert], alpha=weight)
        else:
            # Gathers keep this free of host synchronisation, for CUDA graphs and torch.compile.
            flat = index.reshape(-1)
            h = torch.einsum("tjki,ti->tjk", down[flat].view(n, self.top_k, k, -1), tokens)
            h = h * top.unsqueeze(-1).to(h.dtype)
            out.add_(torch.einsum("tjko,tjk->to", up[flat].view(n, self.top_k, k, -1), h))
        if self.expert_bias is not None:
            dense = torch.zeros_like(logits).scatter(-1, index, top)
            out.addmm_(dense.to(out.dtype), self.expert_bias)


def upscale_modules(model: nn.Module, smile: dict) -> None:
    """Replace each module named in `smile["modules"]` by an (uninitialised) SmileLinear of the same shape."""
    for name, spec in smile["modules"].items():
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
        setattr(parent, child, layer)


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

        name = "Smile" + base_class.__name__
        namespace = {"__init__": __init__, "from_pretrained": from_pretrained, "__module__": __name__}
        _MODEL_CLASSES[base_class] = type(name, (base_class,), namespace)
    return _MODEL_CLASSES[base_class]


def __getattr__(name: str) -> type:
    # transformers resolves `auto_map` entries like "modeling_smile.SmileLlamaForCausalLM" with
    # getattr on this module; build the class for the named transformers architecture on demand.
    base = getattr(transformers, name[len("Smile") :], None) if name.startswith("Smile") else None
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
        return smile_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
