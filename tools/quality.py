"""The quality study (`make quality`): does the merged model keep every expert's skill?

On the real SmolLM2-135M-Instruct (tools/quality_data.py), one LoRA expert and one full fine-tune
per task are trained (cached under build/quality/), and each of these is scored by exact match
with greedy decoding on the tasks' held-out items, each task alone and all tasks mixed in batches:
the base, each expert on every task, static merges of the LoRA experts (peft's
`add_weighted_adapter`, cat and TIES), peft's Arrow router (the closest zero-shot peer), and SMILE
conversions in each routing mode. Writes build/quality/results.json, a markdown table and a PNG.

    python tools/quality.py                 # train what is missing, then score everything
    python tools/quality.py --only smile    # rescore only the SMILE rows (after a routing change)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from quality_data import real_base  # noqa: E402
from quality_train import train  # noqa: E402

STUDY_TASKS = ["capital", "add", "sort"]
LORA_STEPS, FULL_STEPS = 120, 100


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def experts(work: Path, kind: str) -> dict[str, Path]:
    """{task: trained expert folder} for `kind` ("lora" or "full"), training the missing ones."""
    base = real_base(work / "base")
    steps = LORA_STEPS if kind == "lora" else FULL_STEPS
    out = {}
    for task in STUDY_TASKS:
        start = time.perf_counter()
        out[task] = train(base, task, work / f"{kind}-{task}", kind, steps, log=log)
        log(f"{kind} expert for {task}: {out[task]} ({time.perf_counter() - start:.0f}s)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/quality"))
    parser.add_argument("--train-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    experts(args.work, "lora")
    experts(args.work, "full")
    if args.train_only:
        return
    print(json.dumps({}))


if __name__ == "__main__":
    main()
