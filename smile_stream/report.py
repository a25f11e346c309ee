"""Reports: what a person reads about a plan or a converted folder: the `--dry-run` summary, the
notes about non-target tensors, the per-module summary `inspect` prints, and the model card."""

from __future__ import annotations

import math
import re

from .options import command_line
from .plan import Plan


def summarize_modules(smile: dict) -> list[str]:
    """Upscaled modules grouped by their name with layer numbers elided and by the experts they hold,
    with each expert's rank (or range of ranks) there."""
    groups: dict[tuple[str, tuple[str, ...]], dict[str, list[int]]] = {}
    for name, spec in smile["modules"].items():
        ranks = groups.setdefault((module_kind(name), tuple(spec["experts"])), {})
        for expert, rank in zip(spec["experts"], spec["ranks"]):
            ranks.setdefault(expert, []).append(rank)
    layers = {m for name in smile["modules"] for m in re.findall(r"\.(\d+)\.", name)[:1]}
    lines = [f"targets  {len(smile['modules'])} upscaled modules in {len(layers)} layers"]
    for (kind, _), ranks in sorted(groups.items()):
        held = " ".join(f"{e}:r{min(r)}" + (f"-{max(r)}" if max(r) != min(r) else "") for e, r in ranks.items())
        lines.append(f"         {kind:<40} {held}")
    return lines


def module_kind(name: str) -> str:
    """A module's name with its layer number elided: "model.layers.N.self_attn.q_proj"."""
    return re.sub(r"\.\d+\.", ".N.", name)


def energy_table(smile: dict) -> list[str]:
    """Per module kind, for `--expert-rank energy:F` folders: the ranks chosen and the energy they
    keep (mean and lowest over modules and experts). Markdown rows."""
    kinds: dict[str, dict[str, list]] = {}
    for name, spec in smile["modules"].items():
        if "energy" not in spec:
            return []
        entry = kinds.setdefault(module_kind(name), {"ranks": [], "energy": []})
        entry["ranks"] += spec["ranks"]
        entry["energy"] += spec["energy"]
    lines = ["| module kind | ranks (min / mean / max) | energy kept (mean / lowest) |", "|---|---|---|"]
    for kind, entry in sorted(kinds.items()):
        ranks, energy = entry["ranks"], entry["energy"]
        lines.append(
            f"| {kind} | {min(ranks)} / {sum(ranks) / len(ranks):.1f} / {max(ranks)} | "
            f"{sum(energy) / len(energy):.1%} / {min(energy):.1%} |"
        )
    return lines


def spectra_record(plan: Plan) -> dict:
    """What smile-spectra.json holds: per module and expert the singular values (up to the cap) and
    the delta's total energy, with the ranks chosen."""
    return {
        "energy": plan.options.energy,
        "modules": {
            name: {
                "experts": [plan.experts[i].name for i in module.experts],
                "ranks": module.ranks,
                "values": [[float(f"{v:.6g}") for v in values] for values, _ in plan.spectra[name]],
                "total": [float(f"{total:.9g}") for _, total in plan.spectra[name]],
            }
            for name, module in plan.modules.items()
        },
    }


def energy_plot(record: dict, path) -> None:
    """Energy kept against rank, per module kind (mean over its modules and experts), as a PNG."""
    from .route import pyplot

    plt = pyplot()
    curves: dict[str, list[list[float]]] = {}
    for name, entry in record["modules"].items():
        for values, total in zip(entry["values"], entry["total"]):
            running, curve = 0.0, []
            for value in values:
                running += value * value
                curve.append(running / total if total > 0 else 1.0)
            curves.setdefault(module_kind(name), []).append(curve)
    fig, ax = plt.subplots(figsize=(8, 5))
    for kind, members in sorted(curves.items()):
        width = max(map(len, members))
        mean = [sum(c[min(k, len(c) - 1)] for c in members) / len(members) for k in range(width)]
        ax.plot(range(1, width + 1), mean, label=kind.split(".")[-1] if kind.count(".") else kind)
    if record.get("energy"):
        ax.axhline(record["energy"], color="grey", linestyle="--", linewidth=1, label=f"energy:{record['energy']}")
    ax.set_xlabel("rank")
    ax.set_ylabel("fraction of the delta's energy kept")
    ax.set_ylim(0, 1.02)
    ax.set_title("energy vs rank per module kind (mean over layers and experts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def non_target_notes(plan: Plan) -> list[str]:
    """One line per non-target tensor that some full expert changed, with the relative difference,
    per tensor only experts have, and per base tensor left out of the output."""
    how = (
        "averaged over the full experts"
        if plan.options.non_linear == "average"
        else "taken from the base (--non-linear average to average)"
    )
    lines = []
    for tensor, diffs in sorted(plan.changed_non_targets.items()):
        where = ", ".join(f"{e} ({d:.2%})" if math.isfinite(d) else e for e, d in diffs.items())
        fate = f"dropped: {plan.expert_only[tensor]}" if tensor in plan.expert_only else how
        verb = "differs in" if any(map(math.isfinite, diffs.values())) else "is only in"
        lines.append(f"note     {tensor} {verb} {where}: {fate}")
    for tensor, why in sorted(plan.dropped.items()):
        lines.append(f"note     base tensor {tensor} is left out of the output: {why}")
    base_vocab = plan.base.config.get("vocab_size")
    for e in plan.experts:
        vocab = e.source.config.get("vocab_size") if e.kind == "full" else None
        if isinstance(vocab, int) and isinstance(base_vocab, int) and vocab > base_vocab:
            lines.append(
                f"note     expert {e.name} has {vocab - base_vocab} added tokens (vocab {vocab}, base {base_vocab}): their "
                "embedding and output rows are dropped and the base tokenizer is kept"
            )
    return lines


def describe(plan: Plan) -> str:
    """A human summary of the plan: what `--dry-run` prints."""
    lines = [f"base     {plan.base.source}  ({plan.base_params / 1e6:,.1f} M parameters)"]
    for e in plan.experts:
        held = sum(1 for m in plan.modules.values() if plan.experts.index(e) in m.experts)
        lines.append(f"expert   {e.name:<12} {e.kind:<4}  {e.source.source}  in {held} modules")
    opts = plan.options
    lines.append(f"routing  {opts.routing}, gate rank {opts.gate_rank}, top-{opts.top_k}; device {plan.device}; svd {opts.svd}")
    lines += summarize_modules(plan.config["smile"])
    energy = energy_table(plan.config["smile"])
    if energy:
        lines.append(f"energy   --expert-rank energy:{opts.energy} (cap {opts.max_expert_rank or 'each kind default'}):")
        lines += [f"         {row}" for row in energy]
    lines += non_target_notes(plan)
    how = {
        "auto": "placed whole from the base (hard link, else reflink, else copy)",
        "link": "placed whole from the base (hard link, else reflink)",
        "copy": "copied whole from the base (read and checked)",
    }[opts.base_files]
    for shard in (s for s in plan.shards if s.source is not None):
        lines.append(f"shard    {shard.filename} {how}: {shard.source.name}, {shard.size / 1e6:,.1f} MB")
    new = [s for s in plan.shards if s.source is None]
    if new:
        lines.append(f"shards   {len(new)} new shard(s) written: {sum(s.size for s in new) / 1e6:,.1f} MB")
    overhead = plan.added_params / max(plan.base_params, 1)
    lines.append(
        f"output   {plan.output_bytes / 1e6:,.1f} MB in {len(plan.shards)} shard(s); "
        f"+{plan.added_params / 1e6:,.2f} M parameters ({overhead:.2%} over the base)"
    )
    return "\n".join(lines)


def model_card(plan: Plan, out_name: str) -> str:
    smile = plan.config["smile"]
    energy = energy_table(smile)
    if energy:
        energy = [f"Ranks by energy (`--expert-rank energy:{plan.options.energy}`):", "", *energy, ""]
    held: dict[str, list[int]] = {}
    for module in smile["modules"].values():
        for name, rank in zip(module["experts"], module["ranks"]):
            held.setdefault(name, []).append(rank)
    rows = []
    for e in smile["experts"]:
        ranks = held.get(e["name"], [])
        span = f"{min(ranks)}-{max(ranks)}" if ranks and min(ranks) != max(ranks) else str(ranks[0] if ranks else "-")
        rows.append(f"| {e['name']} | {e['kind']} | `{e['source']}` | {span} | {len(ranks)} |")
    overhead = plan.added_params / max(plan.base_params, 1)
    lines = [
        "---",
        f"base_model: {plan.base.source}",
        "library_name: transformers",
        "tags:",
        "- smile",
        "- mixture-of-experts",
        "- merge",
        "- smile-stream",
        "---",
        "",
        f"# SMILE mixture of {len(smile['experts'])} low-rank experts on {plan.base.source}",
        "",
        "A zero-shot Sparse MIxture of Low-rank Experts (SMILE, arXiv 2408.10174) built by smile-stream: each "
        "upscaled linear layer keeps the base weights and routes every token to its top-k experts, each a "
        "low-rank factorisation of one fine-tune's weight delta.",
        "",
        f"- routing: {smile['routing']}, gate rank {smile['gate_rank']}, top-{smile['top_k']}, {len(smile['modules'])} upscaled modules",
        f"- parameters: {plan.base_params:,} base + {plan.added_params:,} expert ({overhead:.2%} overhead)",
        "",
        "| expert | kind | source | rank | modules |",
        "|---|---|---|---|---|",
        *rows,
        "",
        *energy,
        "## Load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, device_map="auto")',
        "```",
        "",
        "The remote code (`modeling_smile.py`) imports only torch and transformers.",
    ]
    command = command_line(plan.base.source, [(e.name, e.source.source) for e in plan.experts], out_name, plan.options)
    lines += ["", "## Made with", "", "```", command, "```"]
    return "\n".join(lines) + "\n"
