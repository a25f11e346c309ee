"""Decode speed of a SMILE model against its base and against the base with one unmerged PEFT LoRA
adapter, side by side in one run, for each routing mode.

The default model has SmolLM2-135M-Instruct's shape (the quality study's real model; decode cost
depends on the shapes, not the values); `--shape mistral-7b-4l` has four decoder layers of
Mistral-7B's shape (4096 wide, 14336 MLP, 32k vocabulary; 4.5 GB in float32), where each layer's
matmuls are 20-80x larger. Both with three LoRA experts (r=16, all seven projections) converted at
gate rank 8, top-1, float32. Per-token time is the slope of generate() between a short and a long
run of forced new tokens, so prefill is excluded; each figure is the median over interleaved
rounds, and the ratios are taken within a round (this machine drifts between minutes).

    python tools/bench_decode.py                         # batch 1 and 50 sequences
    python tools/bench_decode.py --quick                 # fewer rounds (make bench)
    python tools/bench_decode.py --shape mistral-7b-4l   # the 7B shape, 4 layers
    python tools/bench_decode.py --compile --modes module  # every model under torch.compile
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from smile_stream.modeling_smile import ROUTING_MODES

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SMOLLM2_135M = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
# per shape: (new tokens of the short and the long run) for 1 and for 50 sequences
TOKENS = {"smollm2-135m": {1: (4, 36), 50: (2, 10)}, "mistral-7b-4l": {1: (2, 12), 50: (2, 6)}}
BATCHES = [1, 50]  # every shape's


def inputs(work: Path, shape: str) -> tuple[Path, list[Path]]:
    import synthetic

    base, make = work / "base", [sys.executable, str(TOOLS / "make_synthetic_checkpoint.py")]
    if shape == "mistral-7b-4l" and not (base / "config.json").exists():
        subprocess.run([*make, "base", str(base), "--num-layers", "4", "--dtype", "float32"], check=True)
    elif not (base / "config.json").exists():
        synthetic.make_base(base, "llama", seed=0, **SMOLLM2_135M)
    loras = []
    for i in range(3):
        folder = work / f"lora{i}"
        if shape == "mistral-7b-4l" and not (folder / "adapter_config.json").exists():
            subprocess.run([*make, "lora", str(folder), "--base", str(base), "--seed", str(i + 1)], check=True)
        elif not (folder / "adapter_config.json").exists():
            synthetic.make_lora(folder, base, r=16, alpha=32, targets="all-linear", seed=i + 1)
        loras.append(folder)
    return base, loras


def per_token(model, batch: int, short: int, long: int, **generate) -> float:
    """Seconds per decoded token (all sequences of the batch together), prefill excluded."""
    ids = torch.randint(3, 1000, (batch, 16), generator=torch.Generator().manual_seed(batch))
    times = []
    for new in (short, long):
        start = time.perf_counter()
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            **generate,
        )
        times.append(time.perf_counter() - start)
    return (times[1] - times[0]) / (long - short)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(TOKENS), default="smollm2-135m")
    parser.add_argument("--work", type=Path, help="default: build/bench-decode (the 7B shape: build/bench-decode-7b)")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sequences", nargs="+", type=int, choices=BATCHES, default=BATCHES, help="batch sizes decoded")
    parser.add_argument("--modes", nargs="+", choices=ROUTING_MODES, default=list(ROUTING_MODES), help="SMILE routing modes")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile every model's forward and decode with a static KV cache (one mode: switching recompiles)",
    )
    args = parser.parse_args()
    if args.compile and len(args.modes) > 1:
        parser.error("--compile takes one routing mode (--modes MODE): switching modes recompiles the model")
    import transformers
    from peft import PeftModel

    import smile_stream
    from smile_stream import Options, convert

    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work or Path("build/bench-decode" if args.shape == "smollm2-135m" else "build/bench-decode-7b")
    base_folder, loras = inputs(work, args.shape)
    smile = work / "smile"
    if not (smile / "model.safetensors.index.json").exists():
        convert(
            str(base_folder), [(f"e{i}", str(p)) for i, p in enumerate(loras)], smile, Options(gate_rank=8, top_k=1), quiet=True
        )
    load = dict(dtype=torch.float32)
    models = {"base": transformers.AutoModelForCausalLM.from_pretrained(base_folder, **load).eval()}
    models["peft LoRA (unmerged)"] = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_folder, **load), str(loras[0])
    ).eval()
    smile_model = smile_stream.load_model(smile, **load).eval()  # one copy: the modes are switched on it
    modes = {f"SMILE {mode}": mode for mode in args.modes}
    models.update(dict.fromkeys(modes, smile_model))
    smile_model.set_smile_routing(args.modes[0])
    switch = len(modes) > 1  # a new routing state each switch: only when several modes share the model
    generate = {name: {} for name in models}  # generate()'s extra arguments per model
    if args.compile:
        for name, model in models.items():
            model.forward = torch.compile(model.forward)
            generate[name]["cache_implementation"] = "static"
        # what compiling buys: the base as the plain runs measure it, beside the compiled ones
        models["base, eager"] = transformers.AutoModelForCausalLM.from_pretrained(base_folder, **load).eval()
        generate["base, eager"] = {}
    rounds = 3 if args.quick else args.rounds
    compiled = ", torch.compile" if args.compile else ""
    print(f"{args.shape}: {os.cpu_count()} CPUs, torch {torch.__version__}, float32{compiled}, {rounds} rounds")
    print("| batch | model | ms per token | / base |")
    print("|---|---|---|---|")
    for batch in args.sequences:
        short, long = TOKENS[args.shape][batch]
        ratios: dict[str, list[float]] = {name: [] for name in models}
        seconds: dict[str, list[float]] = {name: [] for name in models}
        with torch.no_grad():
            for name, model in models.items():  # warm-up
                if switch and name in modes:
                    model.set_smile_routing(modes[name])
                per_token(model, batch, 1, 3, **generate[name])
            for _ in range(rounds):
                base_time = per_token(models["base"], batch, short, long, **generate["base"])
                for name, model in models.items():
                    if switch and name in modes:
                        model.set_smile_routing(modes[name])
                    took = base_time if name == "base" else per_token(model, batch, short, long, **generate[name])
                    seconds[name].append(took)
                    ratios[name].append(took / base_time)
        for name in models:
            print(
                f"| {batch} | {name} | {1000 * statistics.median(seconds[name]):.2f} | {statistics.median(ratios[name]):.3f}x |"
            )


if __name__ == "__main__":
    main()
