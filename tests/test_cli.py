"""The command line: recipes, --dry-run, inspect, hub ids from the local cache, clean errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smile_stream

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "smile_stream", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=600,
    )


@pytest.fixture(scope="module")
def inputs(models):
    base = models("llama")
    return (
        base,
        models("llama:lora_a", r=4, targets=["q_proj", "v_proj"], seed=5),
        models("llama:lora_b", r=8, targets="all-linear", seed=6),
    )


def test_dry_run_prints_plan_and_writes_nothing(inputs, tmp_path):
    base, a, b = inputs
    out = tmp_path / "out"
    run = cli(
        "convert", "--base", base, "--expert", f"a={a}", "--expert", f"b={b}", "--out", out, "--dry-run", "--gate-rank", "4"
    )
    assert run.returncode == 0, run.stderr
    assert "model.layers.N.self_attn.q_proj" in run.stdout and "a:r4 b:r8" in run.stdout
    assert "model.layers.N.mlp.up_proj" in run.stdout and "b:r8" in run.stdout
    assert "over the base" in run.stdout and "shard(s)" in run.stdout
    assert not out.exists()


def test_recipe_then_inspect(inputs, tmp_path):
    base, a, b = inputs
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f'base = "{base}"\nout = "{tmp_path / "out"}"\ngate_rank = 2\ntop_k = 1\nexpert_rank = 2\n\n[experts]\nfirst = "{a}"\nsecond = "{b}"\n'
    )
    run = cli("convert", recipe, "--quiet")
    assert run.returncode == 0, run.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["smile"]["gate_rank"] == 2 and config["smile"]["top_k"] == 1
    assert config["smile"]["modules"]["model.layers.0.self_attn.q_proj"]["ranks"] == [2, 2]  # truncated
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model: ") and "| first | lora |" in card and "smile-stream convert" in card
    shown = cli("inspect", tmp_path / "out")
    assert shown.returncode == 0, shown.stderr
    assert "first" in shown.stdout and "overhead" in shown.stdout and "model.layers.N.mlp.down_proj" in shown.stdout


def test_flags_override_recipe(inputs, tmp_path):
    base, a, _ = inputs
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'base = "{base}"\ngate_rank = 2\n\n[experts]\nfirst = "{a}"\n')
    run = cli("convert", recipe, "--out", tmp_path / "o", "--gate-rank", "3", "--quiet")
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text())["smile"]["gate_rank"] == 3


def test_truncated_rank_matches_truncated_svd(inputs, tmp_path):
    # --expert-rank below r keeps the top singular directions of the dense LoRA delta.
    from oracle import lora_deltas

    base, _, b = inputs
    out = tmp_path / "o"
    smile_stream.convert(str(base), [("b", str(b))], out, smile_stream.Options(gate_rank=2, expert_rank=3), quiet=True)
    model = smile_stream.load_model(out)
    layer = model.model.layers[1].mlp.down_proj
    delta = lora_deltas(base, b)["model.layers.1.mlp.down_proj"]
    u, s, vh = torch.linalg.svd(delta)
    best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    torch.testing.assert_close((layer.expert_up.t() @ layer.expert_down).double(), best, rtol=1e-4, atol=1e-5)


def test_hub_id_from_offline_cache(inputs, tmp_path):
    base, a, _ = inputs
    cache = tmp_path / "hub"
    for repo, folder in (("org/base", base), ("org/lora", a)):
        root = cache / f"models--{repo.replace('/', '--')}"
        snapshot = root / "snapshots" / ("0" * 40)
        shutil.copytree(folder, snapshot)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    run = cli(
        "convert", "--base", "org/base", "--expert", "x=org/lora", "--out", tmp_path / "o", "--gate-rank", "4", "--quiet", env=env
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "o" / "config.json").read_text())["smile"]["experts"][0]["source"] == "org/lora"
    missing = cli("convert", "--base", "org/absent", "--expert", "x=org/lora", "--out", tmp_path / "o2", env=env)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "org/absent" in missing.stderr and "cache" in missing.stderr
    assert not (tmp_path / "o2").exists()


def test_errors_are_clean(inputs, tmp_path):
    base, a, _ = inputs
    run = cli("convert", "--base", base, "--expert", f"a={a}", "--expert", f"a={a}", "--out", tmp_path / "o")
    assert run.returncode == 2 and "Traceback" not in run.stderr and "unique" in run.stderr
    run = cli("convert", "--base", tmp_path / "nope", "--expert", f"a={a}", "--out", tmp_path / "o")
    assert run.returncode == 2 and "no such folder" in run.stderr and "Traceback" not in run.stderr
    run = cli("convert", "--base", base, "--expert", f"a={a}", "--out", tmp_path / "o", "--top-k", "2", "--debug")
    assert run.returncode == 2 and "Traceback" in run.stderr and "--top-k 2" in run.stderr
    assert not (tmp_path / "o").exists()


def test_readme_documents_every_command():
    readme = (ROOT / "README.md").read_text()
    for command in (
        "make demo",
        "make test",
        "smile-stream convert",
        "smile-stream inspect",
        "smile-stream verify",
        "--dry-run",
        "load_model",
    ):
        assert command in readme
