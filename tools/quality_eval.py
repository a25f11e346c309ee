"""Scoring for the quality study: batched greedy decoding with the chat template, exact match."""

from __future__ import annotations

import random
import time

import torch
from quality_train import encode


def normalise(text: str) -> str:
    return text.strip().rstrip(".").strip()


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], batch: int = 32, max_new_tokens: int = 8) -> list[str]:
    """Greedy answers to `prompts`, left-padded batches, cut at the end-of-turn token."""
    out = []
    for start in range(0, len(prompts), batch):
        encoded = [encode(tokenizer, p)[0] for p in prompts[start : start + batch]]
        width = max(map(len, encoded))
        ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens) :] = torch.tensor(tokens)
            mask[row, width - len(tokens) :] = 1
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return out


def score(model, tokenizer, tests: dict[str, list[tuple[str, str]]], mixed: bool, log=print) -> dict[str, float]:
    """Exact-match accuracy per task. `mixed`: all tasks' items shuffled together into the batches."""
    start = time.perf_counter()
    items = [(task, p, a) for task, pairs in tests.items() for p, a in pairs]
    if mixed:
        random.Random(0).shuffle(items)
    else:
        items.sort(key=lambda item: list(tests).index(item[0]))
    predicted = answers(model, tokenizer, [p for _, p, _ in items])
    hits: dict[str, list[bool]] = {task: [] for task in tests}
    for (task, _, answer), guess in zip(items, predicted):
        hits[task].append(normalise(guess) == normalise(answer))
    log(f"    scored {len(items)} items in {time.perf_counter() - start:.0f}s")
    return {task: sum(h) / len(h) for task, h in hits.items()}
