"""Small locally generated models and experts, for the demo, the tests and the benchmarks.

No hub access: bases are random transformers models of tiny size, LoRA adapters are random peft
adapters (non-zero B), full experts are the base plus low-rank-plus-noise deltas.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),  # q/k/v carry biases
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


def make_full_expert(
    folder: str | Path,
    base: str | Path,
    seed: int = 2,
    rank: int = 8,
    noise: float = 0.002,
    strength: float = 0.05,
    modules: str | None = None,
    bias_noise: float = 0.01,
) -> Path:
    """A "full fine-tune" of the base: every linear weight in the decoder blocks (or those whose name
    contains `modules`) plus a random rank-`rank` delta and dense noise; other tensors unchanged."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name and (modules is None or modules in name):
                out_f, in_f = module.weight.shape
                left = torch.randn(out_f, rank, generator=generator) * strength / rank**0.5
                right = torch.randn(rank, in_f, generator=generator) / in_f**0.5
                delta = left @ right * (in_f / out_f) ** 0.5 + noise * torch.randn(out_f, in_f, generator=generator)
                module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
                if module.bias is not None and bias_noise:
                    module.bias.add_((bias_noise * torch.randn(out_f, generator=generator)).to(module.bias.dtype))
    model.save_pretrained(str(folder))
    save_byte_tokenizer(folder)
    return Path(folder)
