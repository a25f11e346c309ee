"""An independent SMILE oracle: dense deltas, exact float64 SVD, per-token routing in a Python loop.

It shares no code with smile_stream: deltas come from peft (`get_delta_weight`) or from the dense
fine-tuned weights loaded by transformers, and the routing follows DESIGN.md section 1 literally.
"""

from __future__ import annotations

import torch
import transformers
from torch import nn


class OracleSmileLinear(nn.Module):
    def __init__(self, base: nn.Linear, experts: list[tuple[torch.Tensor, torch.Tensor | None, int]], gate_rank: int, top_k: int):
        super().__init__()
        self.w0 = base.weight.detach().double()
        self.b0 = None if base.bias is None else base.bias.detach().double()
        self.top_k = min(top_k, len(experts))
        self.experts = []
        for delta, bias_delta, rank in experts:
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            s = torch.where(s > s[0] * 1e-6, s, torch.zeros_like(s))  # null directions do not route
            gate = vh[:gate_rank] * (s[:gate_rank] > 0).double().unsqueeze(1)
            approx = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
            self.experts.append((gate, approx, None if bias_delta is None else bias_delta.double()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = []
        for token in x.reshape(-1, x.shape[-1]).double():
            y = self.w0 @ token + (0 if self.b0 is None else self.b0)
            logits = torch.stack([torch.linalg.vector_norm(gate @ token) for gate, _, _ in self.experts])
            probs = torch.softmax(logits, 0)
            top, index = probs.topk(self.top_k)
            top = top / top.sum()
            for weight, i in zip(top.tolist(), index.tolist()):
                _, approx, bias = self.experts[i]
                y = y + weight * (approx @ token + (0 if bias is None else bias))
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


def oracle_model(base_folder, experts: list[dict], gate_rank: int, top_k: int, rank: int | None = None):
    """The base model in float64 with every touched linear replaced by an OracleSmileLinear.

    `experts`: dicts {module: (delta, bias_delta or None, rank)} in expert order.
    """
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float64)
    modules = sorted({m for e in experts for m in e})
    for name in modules:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        present = [e[name] for e in experts if name in e]
        setattr(parent, child, OracleSmileLinear(getattr(parent, child), present, gate_rank, top_k))
    return model.eval()
