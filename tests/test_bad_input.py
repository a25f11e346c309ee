"""The bad-input catalogue: each case fails with a message naming the culprit, writes nothing that
looks finished, and leaves the inputs untouched."""

import json
import os
import shutil

import pytest
import torch
from edits import copy, edit_json, edit_tensors
from safetensors.torch import load_file

import smile_stream
from smile_stream import Options, convert

# -- folders -------------------------------------------------------------------------------------


def test_missing_empty_configless_weightless(refused, llama, lora, tmp_path):
    refused(tmp_path / "nope", [("a", lora)], "nope: no such folder")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", [("a", lora)], "empty folder")
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(llama / "model.safetensors", weights_only)
    refused(weights_only, [("a", lora)], "neither config.json .* nor adapter_config.json")
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(llama / "config.json", config_only)
    refused(config_only, [("a", lora)], "config_only has a config.json but no \\*.safetensors")
    refused(llama, [("a", config_only)], "config_only has a config.json but no")


def test_base_must_be_a_model(refused, lora):
    refused(lora, [("a", lora)], "is a LoRA adapter; the base must be a full model")


# -- experts that do not fit the base ------------------------------------------------------------


def test_full_expert_of_other_architecture(refused, llama, tmp_path):
    import synthetic

    narrow = synthetic.make_base(tmp_path / "narrow", "llama", hidden=32, intermediate=64)
    refused(llama, [("n", narrow)], "expert 'n' has hidden_size = 32 but the base has 64")
    deeper = synthetic.make_base(tmp_path / "deeper", "llama", layers=3)
    refused(llama, [("d", deeper)], "num_hidden_layers = 3 but the base has 2")
    other = synthetic.make_base(tmp_path / "qwen", "qwen2")
    refused(llama, [("q", other)], "model_type = 'qwen2' but the base has 'llama'")


def test_lora_for_another_base(refused, llama, tmp_path):
    import synthetic

    narrow = synthetic.make_base(tmp_path / "narrow", "llama", hidden=32, intermediate=64)
    adapter = synthetic.make_lora(tmp_path / "narrow_lora", narrow, r=4, targets=["q_proj"])
    refused(
        llama,
        [("x", adapter)],
        "expert 'x', module 'model.layers.0.self_attn.q_proj': lora_A/lora_B map 32 -> 32 features.*different base",
    )


def test_full_expert_tensor_missing_reshaped_or_retyped(refused, llama, full, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    missing = copy(full, tmp_path / "missing")
    edit_tensors(missing / "model.safetensors", lambda t: t.pop(name))
    refused(llama, [("m", missing)], f"expert 'm' has no tensor '{name}'")
    reshaped = copy(full, tmp_path / "reshaped")
    edit_tensors(reshaped / "model.safetensors", lambda t: t.update({name: t[name][:-1]}))
    refused(llama, [("r", reshaped)], f"expert 'r', tensor '{name}' has shape \\[127, 64\\] but the base's is \\[128, 64\\]")
    retyped = copy(full, tmp_path / "retyped")
    edit_tensors(retyped / "model.safetensors", lambda t: t.update({name: t[name].half()}))
    refused(llama, [("t", retyped)], f"expert 't', tensor '{name}' is F16 but the base's is F32")


def test_lora_keys_and_ranks(refused, llama, lora, tmp_path):
    stray = copy(lora, tmp_path / "stray")
    weights = stray / "adapter_model.safetensors"
    edit_tensors(
        weights, lambda t: t.update({k.replace("layers.1.", "layers.7."): t.pop(k) for k in list(t) if "layers.1." in k})
    )
    refused(llama, [("s", stray)], "adapts 'model.layers.7.self_attn.q_proj', which is not a module of the base model")
    head = copy(lora, tmp_path / "head")
    edit_tensors(
        head / "adapter_model.safetensors",
        lambda t: t.update(
            {
                "base_model.model.lm_head.lora_A.weight": torch.randn(4, 64),
                "base_model.model.lm_head.lora_B.weight": torch.randn(320, 4),
            }
        ),
    )
    refused(llama, [("h", head)], "adapts 'lm_head', which is not a target. Widen --targets")
    ranks = copy(lora, tmp_path / "ranks")
    edit_json(ranks / "adapter_config.json", r=8)
    refused(llama, [("r", ranks)], "has rank 4 in its lora_A/lora_B tensors but 8 in adapter_config.json")
    mismatched = copy(lora, tmp_path / "mismatched")
    edit_tensors(
        mismatched / "adapter_model.safetensors",
        lambda t: t.update({k: t[k][:, :3].contiguous() for k in list(t) if "q_proj.lora_B" in k}),
    )
    refused(llama, [("m", mismatched)], "lora_A of shape \\[4, 64\\] and lora_B of shape \\[64, 3\\]; their ranks disagree")


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("use_dora", True, "of this DoRA adapter has no lora_magnitude_vector"),
        ("modules_to_save", ["lm_head"], "modules_to_save is set"),
        ("lora_bias", True, "lora_bias is set"),
        ("init_lora_weights", "pissa", "init_lora_weights is 'pissa'.*change the base weights"),
        ("init_lora_weights", "olora", "init_lora_weights is 'olora'"),
        ("loftq_config", {"loftq_bits": 4}, "loftq_config is set"),
        ("peft_type", "IA3", "peft_type is 'IA3'"),
    ],
)
def test_adapter_kinds_that_are_not_plain_lora(refused, llama, lora, tmp_path, field, value, match):
    odd = copy(lora, tmp_path / "odd")
    edit_json(odd / "adapter_config.json", **{field: value})
    refused(llama, [("o", odd)], match)


def test_adapter_tensors_that_are_not_plain_lora(refused, llama, lora, tmp_path):
    embedding = copy(lora, tmp_path / "emb")
    edit_tensors(
        embedding / "adapter_model.safetensors",
        lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.randn(4, 320)}),
    )
    refused(llama, [("e", embedding)], "lora_embedding_A.*LoRA on embeddings")
    dora = copy(lora, tmp_path / "dora")
    edit_tensors(
        dora / "adapter_model.safetensors",
        lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}),
    )
    refused(llama, [("d", dora)], "lora_magnitude_vector' is not a lora_A/lora_B weight.*DoRA magnitudes need use_dora = true")
    biased = copy(lora, tmp_path / "bias")
    edit_tensors(
        biased / "adapter_model.safetensors",
        lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias": torch.ones(64)}),
    )
    refused(llama, [("b", biased)], "lora_B.bias' is not a lora_A/lora_B weight")


# -- damaged files -------------------------------------------------------------------------------


def test_damaged_safetensors(refused, llama, lora, tmp_path):
    truncated = copy(llama, tmp_path / "truncated")
    path = truncated / "model.safetensors"
    os.truncate(path, path.stat().st_size - 100)
    refused(truncated, [("a", lora)], "data offsets .* do not fit .*truncated or corrupted")
    bad_length = copy(llama, tmp_path / "bad_length")
    path = bad_length / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    refused(bad_length, [("a", lora)], "header length field \\(1000000000000\\) does not fit")
    bad_json = copy(llama, tmp_path / "bad_json")
    path = bad_json / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8] = ord("x")
    path.write_bytes(bytes(data))
    refused(bad_json, [("a", lora)], "header is not valid JSON")
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    shutil.copy(llama / "config.json", tiny)
    (tiny / "model.safetensors").write_bytes(b"\x01\x02")
    refused(tiny, [("a", lora)], "not a valid safetensors file")


def _sharded(llama, folder, shard_name):
    folder.mkdir()
    shutil.copy(llama / "config.json", folder)
    shutil.copy(llama / "model.safetensors", folder / "model-00001-of-00001.safetensors")
    keys = list(load_file(llama / "model.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: shard_name for k in keys}})
    )
    return folder


def test_index_problems(refused, llama, lora, tmp_path):
    refused(
        _sharded(llama, tmp_path / "missing", "model-00002-of-00002.safetensors"),
        [("a", lora)],
        "names shards that are not in the folder: \\['model-00002-of-00002.safetensors'\\]",
    )
    refused(
        _sharded(llama, tmp_path / "up", "../model.safetensors"),
        [("a", lora)],
        "the shard '../model.safetensors' points outside the model folder",
    )
    refused(
        _sharded(llama, tmp_path / "abs", str(llama / "model.safetensors")),
        [("a", lora)],
        "points outside the model folder",
    )
    linked = _sharded(llama, tmp_path / "link", "evil.safetensors")
    (linked / "evil.safetensors").symlink_to(llama / "model.safetensors")
    refused(linked, [("a", lora)], "is a symlink \\(or lies under one\\) leading out of the input folder")


def test_nan_in_weights(refused, llama, lora, full, tmp_path):
    base = copy(llama, tmp_path / "nan_base")
    edit_tensors(base / "model.safetensors", lambda t: t["model.norm.weight"].__setitem__(3, float("nan")))
    # base files are read (and checked) only when copied; a hard link never reads them
    refused(base, [("a", lora)], "tensor 'model.norm.weight' holds NaN or Inf", base_files="copy")
    adapter = copy(lora, tmp_path / "inf_lora")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    edit_tensors(adapter / "adapter_model.safetensors", lambda t: t[key].__setitem__((0, 0), float("inf")))
    refused(llama, [("a", adapter)], f"tensor '{key}' holds NaN or Inf")
    expert = copy(full, tmp_path / "nan_full")
    edit_tensors(
        expert / "model.safetensors", lambda t: t["model.layers.0.mlp.down_proj.weight"].__setitem__((1, 1), float("nan"))
    )
    refused(llama, [("f", expert)], "tensor 'model.layers.0.mlp.down_proj.weight' holds NaN or Inf")


# -- options -------------------------------------------------------------------------------------


def test_option_errors(refused, llama, lora, full):
    refused(
        llama,
        [("f", full)],
        "--expert-rank 65 is larger than module model.layers.0.mlp.down_proj allows for full expert .f.: its delta is 64 wide",
        expert_rank=65,
    )
    refused(llama, [("a", lora)], "--gate-rank 8 is larger than --expert-rank 4", gate_rank=8, expert_rank=4)
    refused(llama, [("a", lora)], "--top-k 2 is larger than the number of experts \\(1\\)", top_k=2)
    refused(llama, [], "No experts given")
    refused(llama, [("a", lora), ("a", full)], "\\['a'\\] given more than once")
    refused(llama, [("a", lora)], "No linear layer of the base matches --targets 'nothing_matches'", targets="nothing_matches")


def test_expert_equal_to_base(refused, llama, lora, tmp_path):
    refused(llama, [("same", copy(llama, tmp_path / "same"))], "expert 'same' has the same weights as the base")
    zero = copy(lora, tmp_path / "zero")
    edit_tensors(zero / "adapter_model.safetensors", lambda t: [v.zero_() for k, v in t.items() if "lora_B" in k])
    refused(llama, [("z", zero)], "expert 'z' is equal to the base: every lora_A or lora_B is zero")


# -- pickle and remote code ----------------------------------------------------------------------


def test_pickle_refused_then_allowed(refused, llama, lora, tmp_path, monkeypatch):
    monkeypatch.setenv("SMILE_STREAM_CACHE", str(tmp_path / "cache"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama / "config.json", pickled)
    torch.save(load_file(llama / "model.safetensors"), pickled / "pytorch_model.bin")
    refused(pickled, [("a", lora)], "holds only pickle weights \\(pytorch_model.bin\\).*--allow-pickle")
    pickled_lora = copy(lora, tmp_path / "pickled_lora")
    torch.save(load_file(pickled_lora / "adapter_model.safetensors"), pickled_lora / "adapter_model.bin")
    (pickled_lora / "adapter_model.safetensors").unlink()
    refused(llama, [("a", pickled_lora)], "no adapter_model.safetensors. It has adapter_model.bin: pass --allow-pickle")
    allowed, plain = tmp_path / "allowed", tmp_path / "plain"
    convert(str(pickled), [("a", str(pickled_lora))], allowed, Options(gate_rank=4, allow_pickle=True), quiet=True)
    convert(str(llama), [("a", str(lora))], plain, Options(gate_rank=4), quiet=True)
    ids = torch.randint(3, 300, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(smile_stream.load_model(allowed)(ids).logits, smile_stream.load_model(plain)(ids).logits)


def test_remote_code_base_refused(refused, llama, lora, tmp_path):
    remote = copy(llama, tmp_path / "remote")
    edit_json(remote / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
    refused(remote, [("a", lora)], "asks for remote code \\(auto_map\\).*--trust-remote-code")
