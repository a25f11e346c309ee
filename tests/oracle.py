"""An independent SMILE oracle: dense deltas, exact float64 SVD, per-token routing in a Python loop.

It shares no code with smile_stream: deltas come from peft (`get_delta_weight`) or from the dense
fine-tuned weights loaded by transformers, and the routing follows DESIGN.md section 1 literally.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn


class OraclePool:
    """Routing evidence shared by the oracle modules of one model, written from the definition.

    For token t at module m (in the order the forward pass reaches them), with e_i(m', t) =
    l_i(m', t) / sum_j l_j(m', t) (the module's share) and n_i(m) the modules up to m holding i:
      token:    score_i = sum over modules m' <= m holding i of e_i(m', t), / n_i(m)
      sequence: the same summed over the sequence's non-padding tokens t' <= t as well.
    """

    def __init__(self, mode: str):
        self.mode = mode
        self.start(None, None)

    def start(self, shape, mask):
        self.shape, self.mask = shape, mask
        self.running: dict[tuple[int, int], dict[int, float]] = {}
        self.presence: dict[int, int] = {}

    def scores(self, experts: list[int], evidence: list[list[float]]) -> list[list[float]]:
        batch, length = self.shape
        for i in experts:
            self.presence[i] = self.presence.get(i, 0) + 1
        for n, row in enumerate(evidence):
            sums = self.running.setdefault(divmod(n, length), {})
            for i, value in zip(experts, row):
                sums[i] = sums.get(i, 0.0) + value
        out = []
        for n in range(len(evidence)):
            b, t = divmod(n, length)
            if self.mode == "token":
                keys = [(b, t)]
            else:
                keys = [(b, u) for u in range(t + 1) if self.mask is None or self.mask[b][u]]
            out.append([sum(self.running[k].get(i, 0.0) for k in keys) / self.presence[i] for i in experts])
        return out


class OracleSmileLinear(nn.Module):
    """DESIGN.md section 1 token by token in float64: y = W0 x + b0 + sum over the top_k experts of
    p_i (approx_i x + db_i), with p the renormalised softmax of the router logits ||gate_i x||."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, experts: list[tuple], top_k: int):
        """`experts`: (gate (g_i, in), approx (out, in), bias delta (out,) or None) per expert."""
        super().__init__()
        self.pool: OraclePool | None = None  # pooled routing: shared with the model's other oracle modules
        self.expert_ids = list(range(len(experts)))
        self.record: list[tuple[dict[int, float], float]] | None = None
        self.w0 = weight.detach().double()
        self.b0 = None if bias is None else bias.detach().double()
        self.top_k = min(top_k, len(experts))
        self.experts = [
            (g.detach().double(), a.detach().double(), None if b is None else b.detach().double()) for g, a, b in experts
        ]

    @classmethod
    def from_deltas(
        cls, base: nn.Linear, experts: list[tuple[torch.Tensor, torch.Tensor | None, int]], gate_rank: int, top_k: int
    ):
        """Experts given as dense deltas (delta, bias delta or None, rank): exact float64 SVD, truncated."""
        factored = []
        for delta, bias_delta, rank in experts:
            u, s, vh = torch.linalg.svd(delta.detach().double(), full_matrices=False)
            s = torch.where(s > s[0] * 1e-6, s, torch.zeros_like(s))  # null directions do not route
            gate = vh[:gate_rank] * (s[:gate_rank] > 0).double().unsqueeze(1)
            factored.append((gate, u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank], bias_delta))
        return cls(base.weight, base.bias, factored, top_k)

    @classmethod
    def from_factors(cls, weight, bias, downs, ups, gate_rank: int, top_k: int, bias_deltas=None):
        """Experts given as factors: the gate is the first rows of each `down` as they are."""
        deltas = bias_deltas or [None] * len(downs)
        return cls(weight, bias, [(d[:gate_rank], u.double() @ d.double(), b) for d, u, b in zip(downs, ups, deltas)], top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1]).double()
        logits = [torch.stack([torch.linalg.vector_norm(gate @ token) for gate, _, _ in self.experts]) for token in tokens]
        chooser = logits
        if self.pool is not None:
            evidence = [(row / row.sum()).tolist() for row in logits]
            chooser = [torch.tensor(row, dtype=torch.float64) for row in self.pool.scores(self.expert_ids, evidence)]
        rows = []
        for token, row, choose in zip(tokens, logits, chooser):
            y = self.w0 @ token + (0 if self.b0 is None else self.b0)
            index = choose.topk(self.top_k).indices
            top = torch.softmax(row, 0)[index]
            picked = {}
            for weight, i in zip((top / top.sum()).tolist(), index.tolist()):
                _, approx, bias = self.experts[i]
                y = y + weight * (approx @ token + (0 if bias is None else bias))
                picked[self.expert_ids[i]] = weight
            if self.record is not None:  # each token's routing {expert (model-wide): weight}, and how
                ranked = choose.sort(descending=True).values  # clear the choice was (relative margin)
                margin = (
                    float((ranked[self.top_k - 1] - ranked[self.top_k]) / ranked[0].abs()) if len(ranked) > self.top_k else 1.0
                )
                self.record.append((picked, margin))
            rows.append(y)
        return torch.stack(rows).reshape(*x.shape[:-1], -1).to(x.dtype)


def lora_deltas(base_folder, adapter_folder) -> dict[str, torch.Tensor]:
    """{module name: dense delta} straight from peft's own LoRA layers."""
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float64)
    peft_model = PeftModel.from_pretrained(model, str(adapter_folder)).to(torch.float64)
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name] = module.get_delta_weight("default").detach().double()
    return deltas


def full_deltas(base_folder, expert_folder) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float64)
    expert = transformers.AutoModelForCausalLM.from_pretrained(str(expert_folder), dtype=torch.float64)
    experts = dict(expert.named_modules())
    out = {}
    for name, module in base.named_modules():
        if isinstance(module, nn.Linear) and ".layers." in name:
            other = experts[name]
            delta = other.weight.detach() - module.weight.detach()
            bias = None if module.bias is None else other.bias.detach() - module.bias.detach()
            if delta.any() or (bias is not None and bias.any()):
                out[name] = (delta, bias if bias is not None and bias.any() else None)
    return out


def oracle_model(base_folder, experts: list[dict], gate_rank: int, top_k: int, routing: str | None = None):
    """The base model in float64 with every touched linear replaced by an OracleSmileLinear.

    `experts`: dicts {module: (delta, bias_delta or None, rank)} in expert order. `routing`: the
    mode to follow (default: the conversion default, Options().routing); with a pooled mode, call
    it as model(ids, attention_mask=...) for one whole forward pass.
    """
    from smile_stream import Options

    routing = routing or Options().routing
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float64)
    pool = OraclePool(routing) if routing != "module" else None
    modules = sorted({m for e in experts for m in e})
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        present = [e[name] for e in experts if name in e]
        layer = OracleSmileLinear.from_deltas(getattr(parent, child), present, gate_rank, top_k)
        layer.pool, layer.expert_ids = pool, [i for i, e in enumerate(experts) if name in e]
        setattr(parent, child, layer)
    if pool is not None:
        forward = model.forward

        def pooled_forward(input_ids, attention_mask=None, **kwargs):
            pool.start(tuple(input_ids.shape), None if attention_mask is None else attention_mask.tolist())
            return forward(input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)

        model.forward = pooled_forward
    return model.eval()
