"""Routing modes: each against the float64 per-token oracle written from its definition, and the
sequence mode's state under generation (KV cache vs one pass, batches, padding, beams, sampling)."""

import json

import pytest
import torch
from loaders import LOADERS
from oracle import full_deltas, lora_deltas, oracle_model

import smile_stream
from smile_stream import Options, SmileError, convert

MODES = ["module", "token", "sequence"]


@pytest.fixture(scope="module")
def setup(models, tmp_path_factory):
    """Two LoRA experts with different module coverage and a full expert, and one conversion per mode."""
    base = models("llama")
    experts = [
        ("all", models("llama:lora_route_all", r=4, targets="all-linear", seed=80)),
        ("attn", models("llama:lora_route_attn", r=6, targets=["q_proj", "v_proj", "o_proj"], seed=81)),
        ("full", models("llama:full_route", seed=82)),
    ]
    root = tmp_path_factory.mktemp("routing")
    outs = {}
    for mode in MODES:
        outs[mode] = root / mode
        convert(
            str(base),
            [(n, str(p)) for n, p in experts],
            outs[mode],
            Options(gate_rank=2, top_k=1, expert_rank=8, routing=mode),
            quiet=True,
        )
    deltas = [
        {m: (d, None, 4) for m, d in lora_deltas(base, experts[0][1]).items()},
        {m: (d, None, 6) for m, d in lora_deltas(base, experts[1][1]).items()},
        {m: (d, b, 8) for m, (d, b) in full_deltas(base, experts[2][1]).items()},
    ]
    return base, deltas, outs


def _batch():
    ids = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loader", list(LOADERS))
def test_each_mode_matches_its_oracle(setup, mode, loader):
    base, deltas, outs = setup
    ids, mask = _batch()
    assert json.loads((outs[mode] / "config.json").read_text())["smile"]["routing"] == mode
    model = LOADERS[loader](outs[mode])
    oracle = oracle_model(base, deltas, gate_rank=2, top_k=1, routing=mode)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits.double()
        expected = oracle(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], expected[real], rtol=3e-4, atol=3e-4)


def test_modes_route_differently(setup):
    # the pooled modes are not the paper's mode under another name: their oracles disagree somewhere
    base, deltas, _ = setup
    ids, mask = _batch()
    with torch.no_grad():
        outputs = {mode: oracle_model(base, deltas, 2, 1, routing=mode)(ids, attention_mask=mask).logits for mode in MODES}
    assert not torch.allclose(outputs["module"], outputs["token"]) and not torch.allclose(outputs["token"], outputs["sequence"])


def test_sequence_mode_token_by_token_equals_one_pass(setup):
    _, _, outs = setup
    model = smile_stream.load_model(outs["sequence"])
    ids, mask = _batch()
    with torch.no_grad():
        whole = model(ids, attention_mask=mask).logits
        out = model(ids[:, :4], attention_mask=mask[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, ids.shape[1]):
            out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        # each sequence alone: nothing leaks between the sequences of a batch
        alone = torch.cat([model(ids[b : b + 1, mask[b].bool()]).logits for b in range(3)], 1)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], whole[real], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alone[0], whole[real], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", [dict(do_sample=False), dict(do_sample=True, top_k=5), dict(num_beams=3, do_sample=False)])
def test_generate_with_cache_equals_without(setup, settings):
    # without a cache every step reruns the whole sequence in one pass: the definition itself
    _, _, outs = setup
    model = smile_stream.load_model(outs["sequence"])
    ids, mask = _batch()
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        runs.append(
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=6,
                use_cache=use_cache,
                pad_token_id=0,
                output_scores=True,
                return_dict_in_generate=True,
                **settings,
            )
        )
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for a, b in zip(runs[0].scores, runs[1].scores):
        finite = torch.isfinite(a) & torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


def test_routing_can_change_after_loading(setup):
    base, deltas, outs = setup
    ids, mask = _batch()
    model = smile_stream.load_model(outs["module"], routing="sequence")
    assert model.config.smile["routing"] == "sequence"
    with torch.no_grad():
        expected = oracle_model(base, deltas, 2, 1, routing="sequence")(ids, attention_mask=mask).logits
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits.double()[mask.bool()], expected[mask.bool()], rtol=3e-4, atol=3e-4
        )
    with pytest.raises(ValueError, match="routing mode 'bogus'"):
        model.set_smile_routing("bogus")
    with pytest.raises(SmileError, match="--routing 'bogus': choose module, token, sequence"):
        convert(str(base), [("a", str(outs["module"]))], outs["module"].parent / "x", Options(routing="bogus"), quiet=True)


@pytest.mark.parametrize("mode", ["token", "sequence"])
def test_one_sequence_decoded_token_by_token(setup, mode):
    # one token of one sequence takes the layer's Python decode path: the same routing as one pass
    _, _, outs = setup
    model = smile_stream.load_model(outs[mode])
    ids = torch.randint(3, 300, (1, 10), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        whole = model(ids).logits
        out = model(ids[:, :3], use_cache=True)
        steps = [out.logits]
        for t in range(3, ids.shape[1]):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4)


def test_sequence_mode_any_split_of_the_sequence_into_passes(setup):
    # a first pass of one token per sequence (one-token prompts, batched) leaves history that later
    # passes add to, whatever their length (chunked prefill, speculative decoding): it must hold
    # that pass's evidence at each module, not the later modules' additions
    _, _, outs = setup
    model = smile_stream.load_model(outs["sequence"])
    ids = torch.randint(3, 300, (3, 8), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        whole = model(ids).logits
        out, steps = None, []
        for start, stop in ((0, 1), (1, 3), (3, 4), (4, 7), (7, 8)):
            out = model(ids[:, start:stop], past_key_values=out and out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-4, atol=1e-4)
