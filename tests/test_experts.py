"""Expert kinds (DoRA here; LoRA and full fine-tunes in their own files) against peft's own merge,
and `verify --deep` recomputing the factors from the inputs, including a case it must flag."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from edits import edit_tensors
from oracle import lora_deltas, oracle_model
from safetensors import safe_open
from safetensors.torch import save_file

import smile_stream
from smile_stream import Options, convert


@pytest.fixture(scope="module")
def dora(models, tmp_path_factory):
    """A DoRA adapter whose magnitudes moved away from the base's row norms (as training moves them)."""
    folder = models("llama:lora_dora", r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"], use_dora=True, seed=70)
    moved = tmp_path_factory.mktemp("dora") / "adapter"
    shutil.copytree(folder, moved)
    g = torch.Generator().manual_seed(71)
    edit_tensors(
        moved / "adapter_model.safetensors",
        lambda t: t.update({k: v * (1 + 0.2 * torch.rand(v.shape, generator=g)) for k, v in t.items() if "magnitude" in k}),
    )
    return moved


def _merged_deltas(base, adapter) -> dict[str, torch.Tensor]:
    """{module: merged weight - base weight}, from peft's merge_and_unload in float64."""
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float64)
    before = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    merged = PeftModel.from_pretrained(model, str(adapter)).to(torch.float64).merge_and_unload()
    return {
        n: m.weight.detach() - before[n]
        for n, m in merged.named_modules()
        if isinstance(m, torch.nn.Linear) and n in before and not torch.equal(m.weight, before[n])
    }


def test_dora_at_full_rank_equals_peft_merge(models, dora, tmp_path):
    from peft import PeftModel

    base = models("llama")
    out = tmp_path / "out"
    convert(str(base), [("d", str(dora))], out, Options(gate_rank=4, expert_rank=64), quiet=True)
    config = json.loads((out / "config.json").read_text())["smile"]
    assert config["experts"][0]["kind"] == "dora"
    assert {s["ranks"][0] for s in config["modules"].values()} == {32, 64}  # v_proj is 32 wide, the others 64
    merged = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(dora)
    ).merge_and_unload()
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(smile_stream.load_model(out)(ids).logits, merged(ids).logits, rtol=2e-4, atol=2e-4)


def test_dora_mixed_with_lora_matches_oracle(models, dora, tmp_path):
    base = models("llama")
    lora = models("llama:lora_mix", r=8, targets="all-linear", seed=72)
    out = tmp_path / "out"
    convert(str(base), [("d", str(dora)), ("l", str(lora))], out, Options(gate_rank=4, top_k=1), quiet=True)
    ranks = {n: s["ranks"] for n, s in json.loads((out / "config.json").read_text())["smile"]["modules"].items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == [4, 8]  # a DoRA expert defaults to its adapter's r
    experts = [
        {m: (d, None, 4) for m, d in _merged_deltas(base, dora).items()},
        {m: (d, None, 8) for m, d in lora_deltas(base, lora).items()},
    ]
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = oracle_model(base, experts, 4, 1)(ids).logits
        torch.testing.assert_close(smile_stream.load_model(out)(ids).logits.double(), expected, rtol=2e-4, atol=2e-4)
    problems, report = smile_stream.verify(out, deep=True, samples=6)
    assert problems == [] and sum("relative error" in line for line in report) >= 6


def test_verify_deep_recomputes_and_flags_wrong_factors(models, tmp_path):
    base = models("llama")
    experts = [("f", str(models("llama:full_deep", seed=73))), ("l", str(models("llama:lora_deep", r=4, seed=74)))]
    out = tmp_path / "out"
    convert(str(base), experts, out, Options(gate_rank=4, expert_rank=8, svd="exact"), quiet=True)
    run = subprocess.run(
        [sys.executable, "-m", "smile_stream", "verify", str(out), "--deep", "--samples", "3"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("relative error") == 6 and "ok:" in run.stdout  # 3 modules x 2 experts
    # factors that are valid and checksummed but not the best approximation: only --deep can tell
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.0.self_attn.q_proj.expert_up"
    shard = out / index["weight_map"][name]
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name] * 1.05
    save_file(tensors, shard, metadata={"format": "pt"})
    journal = json.loads((out / "smile-journal.json").read_text())
    journal["shards"][shard.name]["sha256"] = smile_stream.sources.file_sha256(shard)
    (out / "smile-journal.json").write_text(json.dumps(journal))
    assert smile_stream.verify(out)[0] == []  # the shallow checks pass
    problems, _ = smile_stream.verify(
        out, deep=True, samples=len(json.loads((out / "config.json").read_text())["smile"]["modules"])
    )
    assert any("model.layers.0.self_attn.q_proj / " in p and "exceeds the optimal" in p for p in problems), problems
