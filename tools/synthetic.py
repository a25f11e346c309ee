"""Small locally generated models and experts, for the demo, the tests and the benchmarks.

No hub access: bases are random transformers models of tiny size, LoRA adapters are random peft
adapters (non-zero B), full experts are the base plus low-rank-plus-noise deltas.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v carry biases
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 128}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16, "sliding_window": 128}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),  # fused qkv_proj and gate_up_proj
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {}),  # Conv1D linears: refused
}


def tiny_config(
    family: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    vocab: int = 320,
    heads: int = 4,
    kv_heads: int = 2,
):
    import transformers

    config_name, _, extra = FAMILIES[family]
    return getattr(transformers, config_name)(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **extra,
    )


def save_byte_tokenizer(folder: str | Path) -> None:
    """A byte-level BPE tokenizer without merges (259 tokens), so demos can encode and decode text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + pre_tokenizers.ByteLevel.alphabet())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def make_base(
    folder: str | Path,
    family: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "5GB",
    **sizes,
) -> Path:
    """A random model of the given family, saved as a Hugging Face folder with a tokenizer."""
    import transformers

    config = tiny_config(family, **sizes)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family][1])(config).to(dtype)
    with torch.no_grad():  # random biases, so bias handling is exercised
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(str(folder), max_shard_size=max_shard_size)
    save_byte_tokenizer(folder)
    return Path(folder)


def make_lora(
    folder: str | Path,
    base: str | Path,
    r: int = 8,
    targets: list[str] | str = "all-linear",
    alpha: float = 16,
    seed: int = 1,
    scale_b: float = 1.0,
    **lora_kwargs,
) -> Path:
    """A random PEFT LoRA adapter for the base at `base` (B non-zero)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale_b / r**0.5)
    peft_model.save_pretrained(str(folder))
    return Path(folder)


# --- Streaming writers for large synthetic checkpoints (the scale benchmarks) ---------------------

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def mistral_7b_config(num_layers: int = 32):
    """Mistral-7B-v0.1's dimensions (hidden 4096, MLP 14336, 32 heads, 8 KV heads, vocab 32000)."""
    import transformers

    return transformers.MistralConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=num_layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def _parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = getattr(transformers, config.architectures[0] if config.architectures else "AutoModelForCausalLM")._from_config(
            config
        )
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


_POOL = 1 << 22


def _random(shape: tuple[int, ...], name: str, seed: int, std: float = 0.02) -> torch.Tensor:
    """Gaussian-looking values, fast: a random rotation of a per-tensor pool of 4M normal draws,
    tiled (drawing 7 B normals one by one would dominate the benchmark set-up)."""
    from smile_stream.factorize import seed_for

    generator = torch.Generator().manual_seed(seed_for(name, str(seed)))
    n = math.prod(shape)
    pool = torch.randn(min(n, _POOL), generator=generator) * std
    if name.endswith("norm.weight"):
        pool = 1 + pool / std * 0.01
    start = int(torch.randint(len(pool), (1,), generator=generator))
    return pool.repeat(-(-(n + start) // len(pool)))[start : start + n].view(shape)


def _stream(folder: Path, tensors: list, max_shard_size: int, produce, single_name: str = "model.safetensors") -> None:
    """Write tensors as Hugging Face does: one `single_name` file, or shards plus an index."""
    from smile_stream.plan import layout
    from smile_stream.write import write_index, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    shards = layout(tensors, max_shard_size)
    if len(shards) == 1:
        write_shard(shards[0], folder / single_name, produce)
        return
    for shard in shards:
        write_shard(shard, folder / shard.filename, produce)
    write_index(folder, shards, {})


def write_random_checkpoint(
    folder: str | Path, config, dtype: str = "bfloat16", max_shard_size: int = 5 * 10**9, seed: int = 0
) -> Path:
    """A Hugging Face checkpoint of `config` with random weights, written one tensor at a time."""
    from smile_stream.plan import TensorPlan
    from smile_stream.tensors import DTYPE_CODES

    folder = Path(folder)
    config.architectures = config.architectures or [FAMILIES.get(config.model_type, ("", "MistralForCausalLM"))[1]]
    code = DTYPE_CODES[getattr(torch, dtype)]
    tensors = [TensorPlan(name, code, shape, -1, "generate") for name, shape in _parameter_shapes(config).items()]
    _stream(folder, tensors, max_shard_size, lambda t: _random(t.shape, t.name, seed).to(getattr(torch, dtype)))
    config.dtype = dtype
    config.save_pretrained(str(folder))
    save_byte_tokenizer(folder)
    return folder


def write_random_lora(
    folder: str | Path, config, r: int = 16, targets: list[str] | None = None, alpha: float = 32, seed: int = 1
) -> Path:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) for a base of `config`,
    with random A and B (B non-zero), written one tensor at a time."""
    import json

    from smile_stream.plan import TensorPlan

    folder = Path(folder)
    targets = targets or PROJECTIONS
    tensors = []
    for name, shape in _parameter_shapes(config).items():
        module = name.removesuffix(".weight")
        if ".layers." in name and name.endswith(".weight") and module.rsplit(".", 1)[-1] in targets:
            out_f, in_f = shape
            prefix = "base_model.model." + module
            tensors.append(TensorPlan(prefix + ".lora_A.weight", "F32", (r, in_f), -1, "generate"))
            tensors.append(TensorPlan(prefix + ".lora_B.weight", "F32", (out_f, r), -1, "generate"))
    folder.mkdir(parents=True, exist_ok=True)
    _stream(
        folder, tensors, 10**12, lambda t: _random(t.shape, t.name, seed, std=1 / t.shape[-1] ** 0.5), "adapter_model.safetensors"
    )

    adapter_config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "init_lora_weights": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return folder


def write_full_variant(
    folder: str | Path,
    base: str | Path,
    rank: int = 64,
    noise: float = 0.002,
    strength: float = 0.02,
    seed: int = 2,
    max_shard_size: int = 5 * 10**9,
    modules: str | None = None,
    bias_noise: float = 0.0,
) -> Path:
    """A "full fine-tune" of the checkpoint at `base`: each linear weight in the decoder blocks (or
    those whose name contains `modules`) plus a random rank-`rank` delta and dense noise, and their
    biases plus `bias_noise`; other tensors copied. One tensor at a time."""
    import shutil

    from smile_stream.factorize import seed_for
    from smile_stream.plan import TensorPlan
    from smile_stream.sources import Checkpoint

    base, folder = Path(base), Path(folder)
    checkpoint = Checkpoint(base, str(base))
    tensors = [
        TensorPlan(i.name, i.dtype, i.shape, -1, "generate")
        for i in sorted(checkpoint.tensors.values(), key=lambda i: (i.file, i.offset))
    ]
    linears = {
        name
        for name, info in checkpoint.tensors.items()
        if ".layers." in name and name.endswith(".weight") and len(info.shape) == 2
    }

    def produce(t):
        weight = checkpoint.read(t.name)
        module, _, kind = t.name.rpartition(".")
        if ".layers." not in t.name or module + ".weight" not in linears or (modules and modules not in module):
            return weight
        g = torch.Generator().manual_seed(seed_for(t.name, "variant", str(seed)))
        if kind == "bias":
            return (weight.float() + bias_noise * torch.randn(t.shape, generator=g)).to(weight.dtype) if bias_noise else weight

        out_f, in_f = t.shape
        left = torch.randn(out_f, rank, generator=g) * (strength / rank**0.5)
        delta = left @ torch.randn(rank, in_f, generator=g)
        delta += noise * torch.randn(out_f, in_f, generator=g)
        return (weight.float() + delta).to(weight.dtype)

    _stream(folder, tensors, max_shard_size, produce)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, folder / name)
    return folder
