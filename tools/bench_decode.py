"""Decode speed of a SMILE model against its base and against the base with one unmerged PEFT LoRA
adapter, side by side in one run, for each routing mode.

The model has SmolLM2-135M-Instruct's shape (the quality study's real model; decode cost depends on
the shapes, not the values), with three LoRA experts (r=16, all seven projections) converted at
gate rank 8, top-1. Per-token time is the slope of generate() between a short and a long run of
forced new tokens, so prefill is excluded; each figure is the median over interleaved rounds, and
the ratios are taken within a round (this machine drifts between minutes).

    python tools/bench_decode.py            # batch 1 and 50 sequences
    python tools/bench_decode.py --quick    # fewer rounds (make bench)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SMOLLM2_135M = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)


def inputs(work: Path) -> tuple[Path, list[Path]]:
    import synthetic

    base = work / "base"
    if not (base / "config.json").exists():
        synthetic.make_base(base, "llama", seed=0, **SMOLLM2_135M)
    loras = []
    for i in range(3):
        folder = work / f"lora{i}"
        if not (folder / "adapter_config.json").exists():
            synthetic.make_lora(folder, base, r=16, alpha=32, targets="all-linear", seed=i + 1)
        loras.append(folder)
    return base, loras


def per_token(model, batch: int, short: int, long: int) -> float:
    """Seconds per decoded token (all sequences of the batch together), prefill excluded."""
    ids = torch.randint(3, 1000, (batch, 16), generator=torch.Generator().manual_seed(batch))
    times = []
    for new in (short, long):
        start = time.perf_counter()
        model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/bench-decode"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import transformers
    from peft import PeftModel

    import smile_stream
    from smile_stream import Options, convert

    torch.set_num_threads(os.cpu_count() or 1)
    base_folder, loras = inputs(args.work)
    smile = args.work / "smile"
    if not (smile / "model.safetensors.index.json").exists():
        convert(
            str(base_folder), [(f"e{i}", str(p)) for i, p in enumerate(loras)], smile, Options(gate_rank=8, top_k=1), quiet=True
        )
    models = {"base": transformers.AutoModelForCausalLM.from_pretrained(base_folder).eval()}
    models["peft LoRA (unmerged)"] = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_folder), str(loras[0])
    ).eval()
    for mode in ("module", "token", "sequence"):
        models[f"SMILE {mode}"] = smile_stream.load_model(smile, routing=mode).eval()
    rounds = 3 if args.quick else 7
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}, float32, {rounds} rounds")
    print("| batch | model | ms per token | / base |")
    print("|---|---|---|---|")
    for batch, (short, long) in ((1, (4, 36)), (50, (2, 10))):
        ratios: dict[str, list[float]] = {name: [] for name in models}
        seconds: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():
            for model in models.values():  # warm-up
                per_token(model, batch, 1, 3)
            for _ in range(rounds):
                base_time = per_token(models["base"], batch, short, long)
                for name, model in models.items():
                    took = base_time if name == "base" else per_token(model, batch, short, long)
                    seconds[name].append(took)
                    ratios[name].append(took / base_time)
        for name in models:
            print(
                f"| {batch} | {name} | {1000 * statistics.median(seconds[name]):.2f} | {statistics.median(ratios[name]):.3f}x |"
            )


if __name__ == "__main__":
    main()
