"""More model families end to end: Gemma2, Gemma3, Phi-3 (fused qkv_proj, gate_up_proj); GPT-2 refused."""

import pytest
import torch
from loaders import LOADERS
from oracle import lora_deltas, oracle_model

import smile_stream
from smile_stream import Options, convert

ADAPTERS = {
    "gemma2": [dict(r=8, targets="all-linear", seed=1), dict(r=4, targets=["q_proj", "v_proj"], seed=2, use_rslora=True)],
    "gemma3": [dict(r=8, targets="all-linear", seed=1), dict(r=4, targets=["o_proj", "down_proj"], seed=2)],
    "phi3": [dict(r=8, targets="all-linear", seed=1), dict(r=4, targets=["qkv_proj", "gate_up_proj"], seed=2)],
}


@pytest.fixture(scope="module")
def family_outputs(models, tmp_path_factory):
    cache = {}

    def get(family):
        if family not in cache:
            import synthetic

            root = tmp_path_factory.mktemp(family)
            base = synthetic.make_base(root / "base", family, seed=7)
            adapters = [synthetic.make_lora(root / f"lora{i}", base, **kw) for i, kw in enumerate(ADAPTERS[family])]
            out = root / "out"
            convert(
                str(base), [(f"e{i}", str(a)) for i, a in enumerate(adapters)], out, Options(gate_rank=4, top_k=2), quiet=True
            )
            cache[family] = base, adapters, out
        return cache[family]

    return get


@pytest.mark.parametrize("family", list(ADAPTERS))
@pytest.mark.parametrize("loader", ["remote_code", "load_model", "accelerate"])
def test_family_logits_equal_oracle(family_outputs, family, loader):
    base, adapters, out = family_outputs(family)
    model = LOADERS[loader](out)
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(3))
    experts = [{m: (d, None, d.shape[0]) for m, d in lora_deltas(base, a).items()} for a in adapters]
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits.double().cpu()
        expected = oracle_model(base, experts, 4, 2)(ids).logits
    torch.testing.assert_close(logits, expected, rtol=2e-4, atol=2e-4)


def test_phi3_fused_projections_are_upscaled(family_outputs):
    _, _, out = family_outputs("phi3")
    model = smile_stream.load_model(out)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(qkv, smile_stream.SmileLinear) and qkv.ranks == [8, 4]
    assert isinstance(model.model.layers[1].mlp.gate_up_proj, smile_stream.SmileLinear)


def test_gpt2_conv1d_is_refused_clearly(tmp_path):
    import synthetic

    base = synthetic.make_base(tmp_path / "gpt2", "gpt2")
    adapter = synthetic.make_lora(tmp_path / "lora", base, r=4, targets=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(smile_stream.SmileError, match="GPT-2-style Conv1D layer .* not supported"):
        smile_stream.make_plan(str(base), [("a", str(adapter))], Options())
