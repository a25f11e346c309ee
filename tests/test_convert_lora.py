"""End to end: tiny bases + random PEFT LoRA adapters -> convert -> load three ways -> logits vs the oracle."""

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers
from loaders import LOADERS
from oracle import lora_deltas, oracle_model
from safetensors import safe_open

import smile_stream
from smile_stream import Options, convert

ADAPTERS = {  # name: make_lora keyword arguments
    "qv": dict(r=4, alpha=8, targets=["q_proj", "v_proj"], seed=1),
    "rs": dict(r=8, alpha=16, targets="all-linear", use_rslora=True, seed=2),
    "pat": dict(
        r=6,
        alpha=12,
        targets=["k_proj", "o_proj", "gate_proj", "down_proj"],
        rank_pattern={"o_proj": 3},
        alpha_pattern={"down_proj": 20},
        seed=3,
    ),
}
GATE_RANK, TOP_K = 4, 2


def _ids(vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 6), generator=torch.Generator().manual_seed(seed))


def _oracle(models, family, names, top_k=TOP_K):
    """The float64 oracle model of these adapters on the family's base."""
    base = models(family)
    experts = []
    for name in names:
        deltas = lora_deltas(base, models(f"{family}:lora_{name}", **ADAPTERS[name]))
        experts.append({m: (d, None, d.shape[0]) for m, d in deltas.items()})
    return oracle_model(base, experts, GATE_RANK, top_k)


def _oracle_logits(models, family, names, ids, top_k=TOP_K):
    with torch.no_grad():
        return _oracle(models, family, names, top_k)(ids.long()).logits


@pytest.fixture(scope="module")
def converted(models, tmp_path_factory):
    cache = {}

    def get(family: str):
        if family not in cache:
            out = tmp_path_factory.mktemp(f"out_{family}")
            experts = [(n, str(models(f"{family}:lora_{n}", **ADAPTERS[n]))) for n in ADAPTERS]
            convert(str(models(family)), experts, out, Options(gate_rank=GATE_RANK, top_k=TOP_K), quiet=True)
            cache[family] = out
        return cache[family]

    return get


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("loader", list(LOADERS))
def test_logits_equal_oracle(models, converted, family, loader):
    out = converted(family)
    ids = _ids()
    model = LOADERS[loader](out)
    assert type(model).__name__.startswith("Smile")
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits.double().cpu()
    expected = _oracle_logits(models, family, list(ADAPTERS), ids)
    torch.testing.assert_close(logits, expected, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_backbone_through_automodel_equals_oracle(models, converted, family):
    # vLLM's and SGLang's Transformers backends load the backbone with AutoModel and remote code:
    # its hidden states must be the oracle's (the upscaled modules live in the backbone).
    out = converted(family)
    ids = _ids()
    model = transformers.AutoModel.from_pretrained(str(out), trust_remote_code=True)
    assert type(model).__name__ == f"Smile{type(model).__mro__[1].__name__}" and not hasattr(model, "lm_head")
    assert sum(type(m).__name__ == "SmileLinear" for m in model.modules()) > 0
    with torch.no_grad():
        hidden = model(ids, attention_mask=torch.ones_like(ids)).last_hidden_state.double()
        oracle = _oracle(models, family, list(ADAPTERS))
        expected = oracle(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(hidden, expected, rtol=2e-4, atol=2e-4)


def test_output_config_and_module_membership(converted):
    out = converted("llama")
    config = json.loads((out / "config.json").read_text())
    smile = config["smile"]
    assert config["auto_map"] == {
        "AutoModelForCausalLM": "modeling_smile.SmileLlamaForCausalLM",
        "AutoModel": "modeling_smile.SmileLlamaModel",  # the backbone, for serving engines
    }
    assert [e["name"] for e in smile["experts"]] == list(ADAPTERS)
    q = smile["modules"]["model.layers.0.self_attn.q_proj"]
    assert q["experts"] == ["qv", "rs"] and q["ranks"] == [4, 8]
    o = smile["modules"]["model.layers.1.self_attn.o_proj"]
    assert o["experts"] == ["rs", "pat"] and o["ranks"] == [8, 3]
    # up_proj is touched by "rs" alone: a single expert, never routed elsewhere
    assert smile["modules"]["model.layers.0.mlp.up_proj"]["experts"] == ["rs"]
    model = smile_stream.load_model(out)
    layer = model.model.layers[1].self_attn.o_proj
    assert layer.ranks == [8, 3] and layer.expert_down.shape == (11, 64)


def test_untouched_module_stays_plain_linear(models, tmp_path):
    # Only q and v are adapted: every other linear must load as exactly the base linear.
    out = tmp_path / "out"
    convert(str(models("llama")), [("qv", str(models("llama:lora_qv", **ADAPTERS["qv"])))], out, Options(gate_rank=4), quiet=True)
    model = smile_stream.load_model(out)
    base = transformers.AutoModelForCausalLM.from_pretrained(str(models("llama")))
    k_proj = model.model.layers[0].self_attn.k_proj
    assert type(k_proj) is torch.nn.Linear
    assert torch.equal(k_proj.weight, base.model.layers[0].self_attn.k_proj.weight)


def test_single_adapter_top1_equals_peft_merge(models, tmp_path):
    from peft import PeftModel

    adapter = models("llama:lora_rs", **ADAPTERS["rs"])
    out = tmp_path / "out"
    convert(str(models("llama")), [("rs", str(adapter))], out, Options(gate_rank=8, top_k=1), quiet=True)
    ids = _ids()
    base = transformers.AutoModelForCausalLM.from_pretrained(str(models("llama")), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    with torch.no_grad():
        expected = merged(ids).logits
        logits = smile_stream.load_model(out)(ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_small_shards_hold_every_tensor_once(models, tmp_path):
    out = tmp_path / "out"
    experts = [(n, str(models(f"qwen2:lora_{n}", **ADAPTERS[n]))) for n in ADAPTERS]
    convert(str(models("qwen2")), experts, out, Options(gate_rank=4, max_shard_size=20_000), quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 5
    seen, total = {}, 0
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            for key in f.keys():
                assert key not in seen, f"{key} in {seen.get(key)} and {shard}"
                seen[key] = shard
                t = f.get_tensor(key)
                total += t.numel() * t.element_size()
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    with safe_open(str(models("qwen2") / "model.safetensors"), "pt") as f:
        base_keys = set(f.keys())
    config = json.loads((out / "config.json").read_text())
    expert_keys = {f"{m}.{s}" for m in config["smile"]["modules"] for s in ("expert_down", "expert_up")}
    assert set(seen) == base_keys | expert_keys
    assert (
        sum((out / s).stat().st_size for s in shards)
        == sum(8 + int.from_bytes((out / s).read_bytes()[:8], "little") for s in shards) + total
    )


def test_generate_and_offload(models, converted, tmp_path):
    out = converted("qwen2")
    ids = _ids()[:1]
    model = smile_stream.load_model(out, device_map="auto")
    tokens = model.generate(ids.to(model.device), max_new_tokens=6, do_sample=False, pad_token_id=0).cpu()
    # disk offload of a decoder layer holding SMILE layers, and a CPU budget too small for anything
    placement = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    offloaded = smile_stream.load_model(out, device_map=placement, offload_folder=str(tmp_path / "off"))
    assert "disk" in set(offloaded.hf_device_map.values())
    assert torch.equal(
        tokens, offloaded.generate(ids.to(offloaded.device), max_new_tokens=6, do_sample=False, pad_token_id=0).cpu()
    )
    offloaded = smile_stream.load_model(out, device_map="auto", max_memory={"cpu": 10_000}, offload_folder=str(tmp_path / "off2"))
    assert "disk" in set(offloaded.hf_device_map.values())
    run_on = "cuda" if torch.cuda.is_available() else "cpu"  # accelerate's execution device for disk-offloaded weights
    assert torch.equal(tokens, offloaded.generate(ids.to(run_on), max_new_tokens=6, do_sample=False, pad_token_id=0).cpu())

    # and the oracle, fed the same prefix, picks the same next tokens
    with torch.no_grad():
        oracle_next = _oracle_logits(models, "qwen2", list(ADAPTERS), tokens[:, :-1]).argmax(-1)
    assert torch.equal(oracle_next[0, ids.shape[1] - 1 :], tokens[0, ids.shape[1] :])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load(converted, dtype):
    out = converted("llama")
    ids = _ids()
    model = smile_stream.load_model(out, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}  # the experts too, not only the base weights
    with torch.no_grad():
        ref = smile_stream.load_model(out)(ids).logits
        low = model(ids).logits.float()
    assert math.isfinite(low.abs().max().item())
    assert (low - ref).abs().max() < 0.1 * ref.abs().max()  # bf16 keeps ~3 significant digits


def test_remote_code_without_smile_stream(models, converted, tmp_path):
    out = converted("mistral")
    script = f"""
import sys, torch
sys.modules["smile_stream"] = None  # make `import smile_stream` fail
import transformers
model = transformers.AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True, device_map="auto")
ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
torch.save(model(ids.to(model.device)).logits.detach().cpu(), {str(tmp_path / "logits.pt")!r})

print(type(model.model.layers[0].self_attn.q_proj).__module__)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "modeling_smile" in run.stdout and "smile_stream" not in run.stdout
    logits = torch.load(tmp_path / "logits.pt").double()
    torch.testing.assert_close(logits, _oracle_logits(models, "mistral", list(ADAPTERS), _ids()), rtol=2e-4, atol=2e-4)
