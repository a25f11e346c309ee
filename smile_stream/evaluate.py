"""Evaluate: does a model still do each task? Exact match with greedy decoding, the answer's
negative log-likelihood, and for a SMILE model how much of the routing went to the task's expert.

Tasks are JSONL lines `{"task": ..., "prompt": ..., "answer": ...}` (and optionally "system"). The
prompt goes through the tokenizer's chat template when `chat` is set. This is the one evaluator of
the project: `smile-stream evaluate` and the quality study (tools/quality.py) both call `evaluate`.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SmileError
from .route import per_token, recording, smile_modules


@dataclass(frozen=True)
class Item:
    task: str
    prompt: str
    answer: str
    system: str | None = None


def read_tasks(path: str | Path) -> list[Item]:
    """The items of a JSONL task file; every field must be a string."""
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SmileError(f"cannot read the task file {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SmileError(
                f"{where} is not JSON ({exc.msg}): each line is one object like "
                '{"task": "capital", "prompt": "...", "answer": "..."}'
            ) from None
        if not isinstance(entry, dict):
            raise SmileError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        for key in ("task", "prompt", "answer"):
            if not isinstance(entry.get(key), str) or not entry[key].strip():
                raise SmileError(f"{where}: {key!r} must be a non-empty string, got {entry.get(key)!r}")
        if "system" in entry and not isinstance(entry["system"], str):
            raise SmileError(f"{where}: 'system' must be a string, got {entry['system']!r}")
        unknown = set(entry) - {"task", "prompt", "answer", "system"}
        if unknown:
            raise SmileError(f"{where}: unknown keys {sorted(unknown)} (allowed: task, prompt, answer, system)")
        items.append(Item(entry["task"], entry["prompt"], entry["answer"], entry.get("system")))
    if not items:
        raise SmileError(f"{path} holds no tasks")
    return items


def encode(
    tokenizer, prompt: str, answer: str | None = None, system: str | None = None, chat: bool = True
) -> tuple[list[int], int]:
    """Token ids of the prompt (with the answer and an end token after it, when given) and the
    prompt's length. `chat`: through the tokenizer's chat template, with a generation prompt."""
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        ids = tokenizer.encode(f"{system}\n{prompt}" if system else prompt)
    if answer is None:
        return ids, len(ids)
    end = tokenizer.eos_token or ""
    return ids + tokenizer.encode(answer + end, add_special_tokens=False), len(ids)


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip()


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    return ids, mask


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy answers to tokenised prompts, one left-padded batch, cut at the end token."""
    ids, mask = _left_padded(prompts, _pad_id(tokenizer))
    device = next(model.parameters()).device
    generated = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=_pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.batch_decode(generated[:, ids.shape[1] :].cpu(), skip_special_tokens=True)


@torch.no_grad()
def answer_scores(
    model, rows: list[tuple[list[int], int]], pad: int, experts: list[int | None]
) -> list[tuple[float, float | None]]:
    """Teacher-forced (prompt + answer) rows -> per row the answer's mean NLL per token and, where
    `experts[row]` names an expert of a SMILE model, the share of its answer tokens' routing
    weight (over all upscaled modules) that went to that expert."""
    ids, mask = _left_padded([r for r, _ in rows], pad)
    device = next(model.parameters()).device
    smile = bool(smile_modules(model)) and any(e is not None for e in experts)
    if smile:
        with recording(model) as traces:
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        routed = per_token(model, traces)
        routed = routed.view(ids.shape[0], ids.shape[1], *routed.shape[1:])
    else:
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    logprobs = torch.log_softmax(logits.float().cpu(), -1)
    out = []
    width = ids.shape[1]
    for row, ((tokens, prompt_len), expert) in enumerate(zip(rows, experts)):
        start = width - len(tokens) + prompt_len  # first answer position, in padded coordinates
        targets = ids[row, start:]
        nll = -logprobs[row, start - 1 : width - 1].gather(-1, targets.unsqueeze(-1)).mean().item()
        share = None
        if smile and expert is not None:
            weights = routed[row, start:width].sum((0, 1))
            share = (weights[expert] / weights.sum().clamp_min(1e-30)).item()
        out.append((nll, share))
    return out


def evaluate(
    model,
    tokenizer,
    items: list[Item],
    *,
    chat: bool = True,
    mixed: bool = False,
    batch: int = 32,
    max_new_tokens: int = 16,
    nll: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Per task: `accuracy` (exact match after stripping spaces and a final full stop), `nll` (mean
    per answer token), `routing` (for a SMILE model whose experts are named like the tasks) and
    `items`. `mixed`: all tasks' items shuffled together into the batches, else task by task."""
    order = list(items)
    if mixed:
        random.Random(0).shuffle(order)
    else:
        tasks = list(dict.fromkeys(item.task for item in items))
        order.sort(key=lambda item: tasks.index(item.task))
    names = [e["name"] for e in model.config.smile["experts"]] if smile_modules(model) else []
    hits: dict[str, list[bool]] = {}
    losses: dict[str, list[float]] = {}
    routing: dict[str, list[float]] = {}
    for start in range(0, len(order), batch):
        part = order[start : start + batch]
        prompts = [encode(tokenizer, item.prompt, system=item.system, chat=chat)[0] for item in part]
        for item, guess in zip(part, generate_answers(model, tokenizer, prompts, max_new_tokens)):
            hits.setdefault(item.task, []).append(normalise(guess) == normalise(item.answer))
        if nll:
            rows = [encode(tokenizer, item.prompt, item.answer, item.system, chat) for item in part]
            experts = [names.index(item.task) if item.task in names else None for item in part]
            for item, (loss, share) in zip(part, answer_scores(model, rows, _pad_id(tokenizer), experts)):
                losses.setdefault(item.task, []).append(loss)
                if share is not None:
                    routing.setdefault(item.task, []).append(share)
        if progress:
            progress(len(part))
    results = {}
    for task, marks in hits.items():
        entry = {"accuracy": sum(marks) / len(marks), "items": len(marks)}
        if task in losses:
            entry["nll"] = sum(losses[task]) / len(losses[task])
        if task in routing:
            entry["routing"] = sum(routing[task]) / len(routing[task])
        results[task] = entry
    return results


def table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per task, per model its accuracy (and answer NLL, routing share)."""
    models = list(results)
    tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
    header = ["task", "items"]
    for name in models:
        header.append(f"{name} accuracy")
        if any("nll" in s for s in results[name].values()):
            header.append(f"{name} NLL")
        if any("routing" in s for s in results[name].values()):
            header.append(f"{name} routed to its expert")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for task in tasks:
        cells = [task, str(next(s[task]["items"] for s in results.values() if task in s))]
        for name in models:
            entry = results[name].get(task, {})
            cells.append(f"{entry['accuracy']:.2f}" if "accuracy" in entry else "-")
            if any("nll" in s for s in results[name].values()):
                cells.append(f"{entry['nll']:.3f}" if "nll" in entry else "-")
            if any("routing" in s for s in results[name].values()):
                cells.append(f"{entry['routing']:.0%}" if "routing" in entry else "-")
        lines.append("| " + " | ".join(cells) + " |")
    means = ["mean", ""]
    for name in models:
        scores = results[name].values()
        means.append(f"{sum(s['accuracy'] for s in scores) / len(scores):.2f}")
        for key, fmt in (("nll", "{:.3f}"), ("routing", "{:.0%}")):
            values = [s[key] for s in scores if key in s]
            if any(key in s for s in scores):
                means.append(fmt.format(sum(values) / len(values)) if values else "-")
    lines.append("| " + " | ".join(means) + " |")
    return "\n".join(lines)


def bar_chart(
    results: dict[str, dict[str, dict[str, float]]], path: str | Path, title: str = "exact-match accuracy per task"
) -> None:
    """Accuracy per task, one bar per model, as a PNG."""
    from .route import pyplot

    plt = pyplot()
    models = list(results)
    tasks = list(dict.fromkeys(task for scores in results.values() for task in scores))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + len(tasks) * (0.5 + 0.3 * len(models))), 4))
    width = 0.8 / len(models)
    for j, name in enumerate(models):
        values = [results[name].get(task, {}).get("accuracy", math.nan) for task in tasks]
        ax.bar([i + j * width for i in range(len(tasks))], values, width=width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("exact match")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def input_models(folder: str | Path, sources: dict[str, str] | None = None, **kwargs):
    """The models a SMILE folder was made from, one at a time, as (name, model): the base, then each
    expert (a LoRA or DoRA adapter merged into the base by peft, or a full fine-tune). Paths are the
    ones recorded in config.json (relative ones from the current directory); `sources` overrides
    them by name. Only safetensors weights are read, and no remote code is run."""
    import transformers

    from .load import model_class

    smile = model_class(folder)[1].smile
    sources = dict(sources or {})
    unknown = set(sources) - {"base"} - {e["name"] for e in smile["experts"]}
    if unknown:
        raise SmileError(f"--source names {sorted(unknown)} are neither 'base' nor an expert of {folder}")

    def where(name: str, recorded: str) -> str:
        path = sources.get(name, recorded)
        if Path(path).exists() or re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) and not path.startswith("."):
            return path  # a folder here, or a hub id
        raise SmileError(
            f"{name}: {path} (recorded in {folder}/config.json) does not exist here. Run from the folder the "
            f"conversion ran in, or pass --source {name}=PATH."
        )

    def load(name: str, path: str, adapter: str | None = None):
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, **kwargs)
            if adapter is not None:
                from peft import PeftModel

                if Path(adapter).is_dir() and not (Path(adapter) / "adapter_model.safetensors").is_file():
                    raise SmileError(f"{name}: {adapter} has no adapter_model.safetensors (pickled weights are never loaded)")
                model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (OSError, ValueError) as exc:
            raise SmileError(f"{name}: cannot load {adapter or path}: {exc}") from None
        return model.eval()

    base = where("base", smile["base"])
    yield "base", load("base", base)
    for expert in smile["experts"]:
        path = where(expert["name"], expert["source"])
        yield expert["name"], load(expert["name"], path) if expert["kind"] == "full" else load(expert["name"], base, path)
