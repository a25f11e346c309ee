"""`make demo`: build a small Llama-style base and three LoRA adapters locally, convert them with the
CLI from recipes/demo.toml, then load the result with device_map="auto" and generate a few tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    import synthetic
    import torch
    import transformers

    demo = Path("build/demo")
    sizes = dict(hidden=256, layers=4, intermediate=688, vocab=320, heads=8, kv_heads=4)
    start = time.perf_counter()
    if not (demo / "lora-mlp" / "adapter_config.json").exists():
        synthetic.make_base(demo / "base", "llama", seed=0, **sizes)
        synthetic.make_lora(demo / "lora-attention", demo / "base", r=8, targets=["q_proj", "v_proj"], seed=1)
        synthetic.make_lora(demo / "lora-all", demo / "base", r=16, targets="all-linear", seed=2)
        synthetic.make_lora(
            demo / "lora-mlp", demo / "base", r=4, targets=["gate_proj", "up_proj", "down_proj"], use_rslora=True, seed=3
        )
    print(f"inputs ready in {demo} ({time.perf_counter() - start:.1f}s)\n")

    cli = [sys.executable, "-m", "smile_stream.cli"]
    subprocess.run([*cli, "convert", "recipes/demo.toml", "--overwrite"], check=True)
    print()
    subprocess.run([*cli, "inspect", str(demo / "smile")], check=True)

    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo / "smile"), trust_remote_code=True, device_map="auto")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(demo / "smile"))
    prompt = tokenizer("SMILE says", return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    placed = sorted({str(v) for v in getattr(model, "hf_device_map", {"": model.device}).values()})
    print(f"\nloaded {type(model).__name__} with device_map='auto' on {placed}")
    print(f"generated token ids: {tokens[0, prompt['input_ids'].shape[1] :].tolist()} (random weights: the text is noise)")
    print(f"demo finished in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
