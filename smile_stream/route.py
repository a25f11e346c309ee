"""Route: which expert each layer of a loaded SMILE model chose for each token, and how surely.

`recording(model)` collects every SMILE module's routing weights while the model runs (prefill and
decoding alike); `route_prompt` runs a prompt (and optionally greedy new tokens) under it and
returns a `Routing`: per token and layer, the weights summed over the layer's upscaled modules.
`render` draws it for a terminal, `plot` as a PNG.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SmileError

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")


def smile_modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The SMILE layers of a model, by name; also those of remote code (a copy of the class)."""
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == "SmileLinear"]


@contextmanager
def recording(model: torch.nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, each SMILE module's list gets its calls' routing weights (tokens, E_m)."""
    modules = smile_modules(model)
    if not modules:
        raise SmileError("this model has no SMILE layers: is it a smile-stream output folder?")
    traces = {}
    for name, module in modules:
        module.trace = traces[name] = []
    try:
        yield traces
    finally:
        for _, module in modules:
            module.trace = None


def layer_of(name: str) -> int:
    """The decoder layer of a module name: its first numeric component ("model.layers.3.mlp" -> 3)."""
    found = re.search(r"\.(\d+)(\.|$)", name)
    return int(found.group(1)) if found else -1


def per_token(model: torch.nn.Module, traces: dict[str, list[torch.Tensor]]) -> torch.Tensor:
    """Traces -> (tokens, layers, E): each layer's routing weights summed over its modules, experts
    in the folder's order; tokens in the order the model saw them (a batch's rows flattened)."""
    experts = len(model.config.smile["experts"])
    modules = dict(smile_modules(model))
    layers = sorted({layer_of(name) for name in traces})
    out = None
    for name, calls in traces.items():
        if not calls:
            continue
        weights = torch.cat(calls)  # prefill, then one row per decoded token
        if out is None:
            out = torch.zeros(weights.shape[0], len(layers), experts)
        ids = torch.tensor(modules[name].expert_ids)
        out[:, layers.index(layer_of(name))].index_add_(1, ids, weights[: out.shape[0]])
    if out is None:
        raise SmileError("the model ran no SMILE layer: nothing was routed")
    return out


@dataclass
class Routing:
    """The routing of one sequence: tokens (their text), layers, experts, weights (tokens, layers, E),
    and how many tokens are the prompt's (the rest were generated)."""

    mode: str
    tokens: list[str]
    layers: list[int]
    experts: list[str]
    weights: torch.Tensor
    prompt_tokens: int

    def choices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token and layer: the expert with the largest weight, and its share of the layer's weight."""
        total = self.weights.sum(-1).clamp_min(1e-30)
        best, index = self.weights.max(-1)
        return index, best / total

    def shares(self) -> list[float]:
        """Each expert's share of all routing weight."""
        totals = self.weights.sum((0, 1))
        return (totals / totals.sum().clamp_min(1e-30)).tolist()

    def as_json(self) -> dict:
        index, sureness = self.choices()
        return {
            "routing": self.mode,
            "experts": self.experts,
            "layers": self.layers,
            "prompt_tokens": self.prompt_tokens,
            "tokens": [
                {
                    "text": text,
                    "experts": [self.experts[i] for i in index[t].tolist()],
                    "share": [round(v, 4) for v in sureness[t].tolist()],
                }
                for t, text in enumerate(self.tokens)
            ],
            "expert_share": dict(zip(self.experts, self.shares())),
        }


@torch.no_grad()
def route_prompt(model, tokenizer, ids: list[int], new_tokens: int = 0) -> Routing:
    """Run `ids` (and greedy decoding of `new_tokens` more) through the model, recording the routing."""
    device = next(model.parameters()).device
    with recording(model) as traces:
        prompt = torch.tensor([ids], device=device)
        if new_tokens:
            out = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
            all_ids = out[0].tolist()[:-1]  # the last new token is never fed back
        else:
            model(prompt)
            all_ids = ids
        weights = per_token(model, traces)[: len(all_ids)]
    smile = model.config.smile
    return Routing(
        mode=smile.get("routing", "module"),
        tokens=[tokenizer.decode([i]) for i in all_ids],
        layers=sorted({layer_of(name) for name, _ in smile_modules(model)}),
        experts=[e["name"] for e in smile["experts"]],
        weights=weights,
        prompt_tokens=len(ids),
    )


def render(routing: Routing, colour: bool = False, width: int = 12) -> str:
    """A compact heatmap: one row per token, one letter per layer (the layer's expert), lower case
    where the layer's modules disagree (the expert holds under 2/3 of the layer's weight)."""
    import click

    index, sureness = routing.choices()
    lines = [f"routing: {routing.mode}   " + "   ".join(f"{LETTERS[i]} = {name}" for i, name in enumerate(routing.experts))]
    lines.append(" " * (width + 8) + "layers " + f"{routing.layers[0]}..{routing.layers[-1]}")
    for t, text in enumerate(routing.tokens):
        if t == routing.prompt_tokens:
            lines.append(" " * (width + 8) + "-- generated --")
        cells = []
        for expert, sure in zip(index[t].tolist(), sureness[t].tolist()):
            letter = LETTERS[expert % len(LETTERS)]
            letter = letter if sure >= 2 / 3 else letter.lower()
            cells.append(click.style(letter, fg=COLOURS[expert % len(COLOURS)]) if colour else letter)
        shown = repr(text)[1:-1][:width]
        lines.append(f"{t:5d}  {shown:<{width}} {''.join(cells)}")
    shares = routing.shares()
    lines.append("share: " + "  ".join(f"{name} {share:.0%}" for name, share in zip(routing.experts, shares)))
    return "\n".join(lines)


def plot(routings: list[Routing], path: Path) -> None:
    """The heatmaps as a PNG: tokens x layers, a colour per expert, paler where layers disagree."""
    plt = pyplot()
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    first = routings[0]
    fig, axes = plt.subplots(
        1, len(routings), figsize=(2 + 0.22 * len(first.layers) * len(routings), 1.2 + 0.22 * len(first.tokens)), squeeze=False
    )
    palette = [to_rgb(f"C{i}") for i in range(len(first.experts))]
    for ax, routing in zip(axes[0], routings):
        index, sureness = routing.choices()
        image = torch.ones(*index.shape, 3)
        for e, rgb in enumerate(palette):
            strength = (sureness * (index == e)).unsqueeze(-1)
            image = image - strength * (1 - torch.tensor(rgb))
        ax.imshow(image.numpy(), aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(routing.tokens)), [repr(t)[1:-1][:14] for t in routing.tokens], fontsize=7)
        ax.set_xticks(range(len(routing.layers)), routing.layers, fontsize=6)
        ax.set_xlabel("layer")
        ax.set_title(f"routing: {routing.mode}")
        if routing.prompt_tokens < len(routing.tokens):
            ax.axhline(routing.prompt_tokens - 0.5, color="black", linewidth=1)
    handles = [Patch(color=c, label=n) for c, n in zip(palette, first.experts)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pyplot():
    """matplotlib's pyplot without a display, or a clear error naming the optional extra."""
    try:
        import matplotlib
    except ImportError:
        raise SmileError("--png needs matplotlib: pip install 'smile-stream[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
