"""Write large synthetic inputs for the scale benchmarks, streaming (no model is ever held in memory).

    python tools/make_synthetic_checkpoint.py base OUT [--num-layers N] [--dtype bfloat16] [--max-shard-size 5GB]
    python tools/make_synthetic_checkpoint.py lora OUT --base BASE [--r 16] [--targets q_proj,v_proj] [--seed 1]
    python tools/make_synthetic_checkpoint.py full OUT --base BASE [--rank 64] [--seed 2]

`base` writes a Hugging Face checkpoint of Mistral-7B's dimensions (or of `--config config.json`,
any transformers config) with random weights, sharded with an index; `--num-layers` makes
reduced-depth copies. `lora` writes a PEFT adapter for it (default r=16 on all seven projections),
`full` a full fine-tuned variant (base + low-rank-plus-noise deltas on every projection).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import synthetic

from smile_stream.options import parse_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["base", "lora", "full"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--config", type=Path, help="a transformers config.json (default: Mistral-7B's dimensions)")
    parser.add_argument("--num-layers", type=int, help="decoder layers (default: the config's)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--base", type=Path, help="the base checkpoint (lora, full)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--targets", default=",".join(synthetic.PROJECTIONS), help="LoRA target module names")
    parser.add_argument("--rank", type=int, default=64, help="rank of a full variant's low-rank delta")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    if args.kind == "base":
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(args.config)) if args.config else synthetic.mistral_7b_config()
        if args.num_layers:
            config.num_hidden_layers = args.num_layers
        synthetic.write_random_checkpoint(args.out, config, args.dtype, parse_size(args.max_shard_size), args.seed)
    elif args.kind == "lora":
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(args.base))
        synthetic.write_random_lora(args.out, config, r=args.r, targets=args.targets.split(","), seed=args.seed)
    else:
        synthetic.write_full_variant(
            args.out, args.base, rank=args.rank, seed=args.seed, max_shard_size=parse_size(args.max_shard_size)
        )
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(f"{args.kind}: {args.out} ({size / 1e9:.2f} GB) in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
