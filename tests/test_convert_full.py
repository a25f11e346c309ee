"""Full fine-tuned experts: truncated SVD of dense deltas, mixed runs, non-target parameters."""

import json
import shutil

import pytest
import torch
from conftest import REFERENCE_CASES, reference_file
from oracle import full_deltas, lora_deltas, oracle_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import smile_stream
from smile_stream import Options, SmileLinear, convert
from smile_stream.factorize import truncated_svd

RANK, GATE_RANK, TOP_K = 16, 4, 2


def _ids(seed=0):
    return torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(seed))


def _full_expert_specs(base, folders, rank=RANK):
    return [{m: (d, b, rank) for m, (d, b) in full_deltas(base, f).items()} for f in folders]


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("family, device", [("mistral", "cpu"), ("qwen2", "cpu"), pytest.param("qwen2", "cuda", marks=CUDA)])
def test_three_full_experts_match_oracle(models, tmp_path, family, device):
    base = models(family)
    folders = [models(f"{family}:full_{i}", seed=20 + i) for i in range(3)]
    out = tmp_path / "out"
    options = Options(gate_rank=GATE_RANK, top_k=TOP_K, expert_rank=RANK, svd="exact", device=device)
    convert(str(base), [(f"e{i}", str(f)) for i, f in enumerate(folders)], out, options, quiet=True)
    config = json.loads((out / "config.json").read_text())
    biased = [m for m, spec in config["smile"]["modules"].items() if spec["expert_bias"]]
    assert bool(biased) == (family == "qwen2")  # Qwen2 q/k/v carry biases, and the experts changed them
    ids = _ids()
    with torch.no_grad():
        model = smile_stream.load_model(out, device_map="auto")
        logits = model(ids.to(model.device)).logits.double().cpu()
        expected = oracle_model(base, _full_expert_specs(base, folders), GATE_RANK, TOP_K)(ids).logits
    torch.testing.assert_close(logits, expected, rtol=5e-4, atol=5e-4)


def test_mixed_full_and_lora_experts(models, tmp_path):
    base = models("llama")
    full = models("llama:full_0", seed=30)
    lora_qv = models("llama:lora_mq", r=4, targets=["q_proj", "v_proj"], seed=31)
    lora_all = models("llama:lora_ma", r=8, targets="all-linear", seed=32, use_rslora=True)
    out = tmp_path / "out"
    experts = [("full", str(full)), ("qv", str(lora_qv)), ("all", str(lora_all))]
    convert(str(base), experts, out, Options(gate_rank=GATE_RANK, top_k=TOP_K, expert_rank=RANK, svd="randomized"), quiet=True)
    specs = _full_expert_specs(base, [full])
    for folder in (lora_qv, lora_all):
        specs.append({m: (d, None, min(RANK, 8)) for m, d in lora_deltas(base, folder).items()})
    ids = _ids(1)
    with torch.no_grad():
        logits = smile_stream.load_model(out)(ids).logits.double()
        expected = oracle_model(base, specs, GATE_RANK, TOP_K)(ids).logits
    # the randomized SVD of the full expert is not exact: compare with a slightly wider tolerance
    torch.testing.assert_close(logits, expected, rtol=2e-3, atol=2e-3)


def test_partial_expert_only_held_where_it_changed(models, tmp_path):
    base = models("llama")
    only_q = models("llama:full_q", seed=33, modules="q_proj")
    lora = models("llama:lora_mlp", r=4, targets=["up_proj"], seed=34)
    out = tmp_path / "out"
    convert(str(base), [("q", str(only_q)), ("u", str(lora))], out, Options(gate_rank=4, expert_rank=8), quiet=True)
    modules = json.loads((out / "config.json").read_text())["smile"]["modules"]
    assert {m.split(".", 3)[-1] for m in modules} == {"self_attn.q_proj", "mlp.up_proj"}
    assert all(spec["experts"] == ["q"] for m, spec in modules.items() if m.endswith("q_proj"))


def test_non_target_changes_reported_and_averaged(models, tmp_path):
    base = models("llama")
    folders = []
    for i, shift in enumerate((0.1, 0.3)):
        folder = tmp_path / f"e{i}"
        shutil.copytree(models(f"llama:full_{i}", seed=20 + i), folder)
        tensors = load_file(folder / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"] + shift
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(folder)
    experts = [(f"e{i}", str(f)) for i, f in enumerate(folders)]
    plan = smile_stream.make_plan(str(base), experts, Options(gate_rank=4, expert_rank=8))
    w0 = load_file(base / "model.safetensors")["model.norm.weight"]
    assert set(plan.changed_non_targets) == {"model.norm.weight"}
    rel = plan.changed_non_targets["model.norm.weight"]
    assert rel["e0"] == pytest.approx((0.1 * w0.numel() ** 0.5) / w0.norm().item(), rel=1e-3)
    out_base, out_avg = tmp_path / "ob", tmp_path / "oa"
    convert(str(base), experts, out_base, Options(gate_rank=4, expert_rank=8), quiet=True)
    convert(str(base), experts, out_avg, Options(gate_rank=4, expert_rank=8, non_linear="average"), quiet=True)

    def norm_weight(out):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        with safe_open(str(out / index["weight_map"]["model.norm.weight"]), "pt") as f:
            return f.get_tensor("model.norm.weight")

    assert torch.equal(norm_weight(out_base), w0)
    torch.testing.assert_close(norm_weight(out_avg), w0 + 0.2)


def test_expert_with_added_tokens(models, tmp_path):
    # Like dolphin-2.1-mistral-7b over Mistral-7B: extra embedding rows are dropped, with a note.
    base = models("llama")
    folder = tmp_path / "added"
    shutil.copytree(models("llama:full_0", seed=20), folder)
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.cat([tensors[name], torch.randn(2, tensors[name].shape[1])])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 2}))
    out = tmp_path / "out"
    result = convert(str(base), [("x", str(folder))], out, Options(gate_rank=4, expert_rank=8, non_linear="average"), quiet=True)
    from smile_stream.report import non_target_notes

    notes = non_target_notes(result.plan)
    assert any("2 added tokens" in line for line in notes), notes
    model = smile_stream.load_model(out)
    assert model.model.embed_tokens.weight.shape[0] == config["vocab_size"]
    torch.testing.assert_close(
        model.model.embed_tokens.weight, load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    )
    # fewer tokens than the base is refused, naming the field
    config["vocab_size"] -= 10
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(smile_stream.SmileError, match="vocab_size = 310 but the base has 320"):
        smile_stream.make_plan(str(base), [("x", str(folder))], Options())


@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_factorize_stage_reproduces_reference(case):
    # The pipeline's batched SVD engine, fed the reference layers' deltas, reproduces the reference outputs.
    with safe_open(str(reference_file(case)), "pt") as f:
        meta, t = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    n = int(meta["num_experts"])
    w0 = t["pretrained.weight"].float()
    deltas = torch.stack([t[f"expert{i}.weight"].float() - w0 for i in range(n)])
    downs, ups = truncated_svd(deltas, int(meta["k"]), "exact")
    b0 = t.get("pretrained.bias")
    bias_deltas = [t[f"expert{i}.bias"].float() - b0.float() for i in range(n)] if b0 is not None else None
    layer = SmileLinear.from_factors(
        w0, None if b0 is None else b0.float(), list(downs), list(ups), int(meta["gate_k"]), int(meta["top_k"]), bias_deltas
    )
    with torch.no_grad():
        torch.testing.assert_close(layer(t["x"].float()), t["y"].float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 128), (200, 80)])
@pytest.mark.parametrize("rank", [8, 24])
def test_randomized_svd_within_one_percent_of_exact(shape, rank):
    g = torch.Generator().manual_seed(sum(shape) + rank)
    low = torch.randn(3, shape[0], 12, generator=g) @ torch.randn(3, 12, shape[1], generator=g)
    deltas = low * 0.1 + 0.02 * torch.randn(3, *shape, generator=g)
    exact_down, exact_up = truncated_svd(deltas, rank, "exact")
    down, up = truncated_svd(deltas, rank, "randomized", [1, 2, 3])
    for i in range(3):
        exact_err = torch.linalg.norm(deltas[i] - exact_up[i] @ exact_down[i])
        err = torch.linalg.norm(deltas[i] - up[i] @ down[i])
        assert err <= 1.01 * exact_err
    # the same seeds draw the same test matrices: reruns are bit-identical
    again = truncated_svd(deltas, rank, "randomized", [1, 2, 3])
    assert torch.equal(again[0], down) and torch.equal(again[1], up)


@CUDA
def test_cuda_factors_match_cpu():
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, 256, 384, generator=g) @ torch.diag(torch.linspace(1, 0.01, 384)) * 0.1
    for method in ("exact", "randomized"):
        cpu_down, cpu_up = truncated_svd(deltas, 32, method, [1, 2, 3])
        gpu_down, gpu_up = truncated_svd(deltas.cuda(), 32, method, [1, 2, 3])
        torch.testing.assert_close((gpu_up @ gpu_down).cpu(), cpu_up @ cpu_down, rtol=1e-3, atol=1e-4)
