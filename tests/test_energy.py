"""Ranks by energy (`--expert-rank energy:F`): per module and expert the smallest rank holding F of
the delta's squared singular values, checked against an exact SVD of the dense delta."""

import json
import subprocess
import sys

import pytest
import torch
from oracle import full_deltas, lora_deltas, oracle_model
from PIL import Image

import smile_stream
from smile_stream import Options, convert

GATE_RANK = 2


def _expected_rank(delta: torch.Tensor, fraction: float, cap: int) -> tuple[int, float]:
    """From an exact SVD (float64): the smallest rank with >= fraction of the energy, floored at the
    gate rank and capped; and the energy that rank keeps."""
    energy = torch.linalg.svdvals(delta.double()).square()
    cumulative = energy.cumsum(0) / energy.sum()
    rank = int((cumulative < fraction - 1e-12).sum()) + 1
    rank = max(min(GATE_RANK, cap), min(rank, cap))
    return rank, float(cumulative[rank - 1])


def test_lora_ranks_hold_the_asked_energy_and_the_model_matches_the_oracle(models, tmp_path):
    base = models("llama")
    adapters = [
        models("llama:lora_e1", r=8, targets="all-linear", seed=41),
        models("llama:lora_e2", r=6, targets=["q_proj", "v_proj"], seed=42),
    ]
    out = tmp_path / "out"
    options = Options(gate_rank=GATE_RANK, top_k=1, expert_rank="energy:0.8")
    convert(str(base), [("a", str(adapters[0])), ("b", str(adapters[1]))], out, options, quiet=True)
    smile = json.loads((out / "config.json").read_text())["smile"]
    deltas = [lora_deltas(base, a) for a in adapters]
    seen = set()
    for module, spec in smile["modules"].items():
        for expert, rank, kept in zip(spec["experts"], spec["ranks"], spec["energy"]):
            i = "ab".index(expert)
            want, want_kept = _expected_rank(deltas[i][module], 0.8, cap=(8, 6)[i])
            assert (rank, round(kept, 4)) == (want, round(want_kept, 4)), (module, expert)
            seen.add(rank)
    assert len(seen) > 1, "ranks should differ between modules: the test spectra are not degenerate"
    experts = [
        {m: (d, None, r) for m, d in e.items() for r in [smile["modules"][m]["ranks"][smile["modules"][m]["experts"].index(n)]]}
        for e, n in zip(deltas, "ab")
    ]
    ids = torch.randint(3, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = smile_stream.load_model(out)(ids).logits.double()
        expected = oracle_model(base, experts, GATE_RANK, 1)(ids).logits
    torch.testing.assert_close(logits, expected, rtol=2e-4, atol=2e-4)
    assert smile_stream.verify(out)[0] == []


def test_full_expert_ranks_capped_and_from_the_exact_spectrum(models, tmp_path):
    base = models("qwen2")
    full = models("qwen2:full_e", seed=43)
    out = tmp_path / "out"
    options = Options(gate_rank=GATE_RANK, top_k=1, expert_rank="energy:0.3", max_expert_rank=12, svd="exact")
    convert(str(base), [("f", str(full))], out, options, quiet=True)
    smile = json.loads((out / "config.json").read_text())["smile"]
    ranks = []
    for module, (delta, _) in full_deltas(base, full).items():
        spec = smile["modules"][module]
        want, want_kept = _expected_rank(delta, 0.3, cap=12)
        assert spec["ranks"] == [want] and spec["energy"][0] == pytest.approx(want_kept, abs=1e-4), module
        ranks.append(want)
    assert max(ranks) <= 12 and min(ranks) < 12
    spectra = json.loads((out / "smile-spectra.json").read_text())
    assert set(spectra["modules"]) == set(smile["modules"]) and spectra["energy"] == 0.3


def test_inspect_shows_and_plots_the_energy(models, tmp_path):
    base = models("llama")
    adapter = models("llama:lora_e1", r=8, targets="all-linear", seed=41)
    out, plain = tmp_path / "out", tmp_path / "plain"
    convert(str(base), [("a", str(adapter))], out, Options(gate_rank=GATE_RANK, expert_rank="energy:0.9"), quiet=True)
    convert(str(base), [("a", str(adapter))], plain, Options(gate_rank=GATE_RANK), quiet=True)
    png = tmp_path / "energy.png"
    run = subprocess.run(
        [sys.executable, "-m", "smile_stream", "inspect", str(out), "--png", str(png)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "energy kept" in run.stdout and "self_attn.N.q_proj" not in run.stdout and "q_proj" in run.stdout
    image = Image.open(png).convert("L")
    assert image.size[0] > 400 and image.size[1] > 300
    assert image.getextrema()[0] < 128, "the plot has dark pixels (lines, text), not a blank canvas"
    run = subprocess.run(
        [sys.executable, "-m", "smile_stream", "inspect", str(plain), "--png", str(png)], capture_output=True, text=True
    )
    assert run.returncode == 2 and "smile-spectra.json" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--expert-rank", "energy:1.5"], "0 < F <= 1"),
        (["--expert-rank", "energy"], "0 < F <= 1"),
        (["--expert-rank", "energy:0.9x"], "0 < F <= 1"),
        (["--max-expert-rank", "8"], "--max-expert-rank caps"),
        (["--expert-rank", "energy:0.9", "--max-expert-rank", "0"], "at least 1"),
    ],
)
def test_bad_energy_options(models, tmp_path, flags, message):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "smile_stream",
            "convert",
            "--base",
            str(models("llama")),
            "--expert",
            f"a={models('llama:lora_e1', r=8, targets='all-linear', seed=41)}",
            "--out",
            str(tmp_path / "o"),
            *flags,
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and message in run.stderr, run.stderr
    assert not (tmp_path / "o").exists()


def test_recipe_rank_takes_an_integer_or_an_energy_string(models, tmp_path):
    adapter = models("llama:lora_e1", r=8, targets="all-linear", seed=41)
    for value, ok in (('"energy:0.9"', True), ("8", True), ("true", False), ('"8"', False), ("0.9", False)):
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'base = "{models("llama")}"\nexpert_rank = {value}\n[experts]\na = "{adapter}"\n')
        run = subprocess.run(
            [sys.executable, "-m", "smile_stream", "convert", str(recipe), "--dry-run"], capture_output=True, text=True
        )
        assert (run.returncode == 0) == ok, (value, run.stderr)
