"""Training the experts of the quality study: a LoRA adapter or a full fine-tune per task, on the
CPU, loss on the answer tokens only. Results are cached folders; a finished folder is never retrained."""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
import transformers
from quality_data import SYSTEM, task_items

from smile_stream import evaluate

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def encode(tokenizer, prompt: str, answer: str | None = None) -> tuple[list[int], int]:
    """The study's prompts, through the chat template with the study's system prompt."""
    return evaluate.encode(tokenizer, prompt, answer, system=SYSTEM)


def _batches(tokenizer, items, batch: int, steps: int, seed: int):
    rng = random.Random(seed)
    encoded = [encode(tokenizer, p, a) for p, a in items]
    order = []
    while len(order) < batch * steps:
        chunk = list(range(len(encoded)))
        rng.shuffle(chunk)
        order += chunk
    for step in range(steps):
        rows = [encoded[i] for i in order[step * batch : (step + 1) * batch]]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (ids, start) in enumerate(rows):
            input_ids[j, : len(ids)] = torch.tensor(ids)
            labels[j, start : len(ids)] = torch.tensor(ids[start:])
            mask[j, : len(ids)] = 1
        yield input_ids, labels, mask


def train(base: Path, task: str, out: Path, kind: str, steps: int, batch: int = 16, log=print) -> Path:
    """Train a `kind` ("lora" or "full") expert of `base` on `task` into `out` (cached)."""
    if (out / "done").exists():
        return out
    torch.manual_seed(0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0))
        lr = 1e-3
    else:
        lr = 5e-5
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps))
    train_items, _ = task_items(task, 2000, 200)
    model.train()
    start = time.perf_counter()
    for step, (input_ids, labels, mask) in enumerate(_batches(tokenizer, train_items, batch, steps, seed=1)):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0 or step == steps - 1:
            log(f"  {kind} {task}: step {step + 1}/{steps}, loss {loss.item():.3f}, {time.perf_counter() - start:.0f}s")
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    if kind == "full":
        tokenizer.save_pretrained(out)
    (out / "done").write_text(f"{steps} steps, batch {batch}, lr {lr}\n")
    return out
