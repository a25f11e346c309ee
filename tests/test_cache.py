"""The architecture cache: a base's discovered architecture (built once with transformers) is kept
per config and library versions, so later conversions of that base skip importing transformers."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import smile_stream.architecture as architecture
import smile_stream.sources
from smile_stream import Options, make_plan
from smile_stream.sources import open_source


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SMILE_STREAM_CACHE", str(folder))
    return folder


def _entries(cache: Path) -> list[Path]:
    return sorted((cache / "architectures").glob("*.json")) if (cache / "architectures").is_dir() else []


def _fresh(base: Path) -> architecture.Architecture:
    return architecture._build(open_source(str(base), False), False)


def _plan(base: Path, lora: Path):
    return make_plan(str(base), [("a", str(lora))], Options(gate_rank=2))


def test_a_cached_architecture_is_the_built_one_and_the_next_plan_builds_nothing(models, cache, monkeypatch):
    base, lora = models("llama"), models("llama:lora_c", r=4, targets="all-linear", seed=81)
    first = _plan(base, lora)
    [entry] = _entries(cache)
    fresh = _fresh(base)  # built again, directly: the oracle for what the cache holds
    assert architecture.Architecture.from_record(json.loads(entry.read_text())) == fresh

    def no_build(*args):
        raise AssertionError("built the model again instead of reading the cache")

    monkeypatch.setattr(architecture, "_build", no_build)
    second = _plan(base, lora)
    assert second.config == first.config and second.hash == first.hash
    assert [s.filename for s in second.shards] == [s.filename for s in first.shards]
    assert second.config["auto_map"]["AutoModel"] == "modeling_smile.SmileLlamaModel"


def test_each_config_has_its_own_entry(models, cache):
    llama, qwen = models("llama"), models("qwen2")
    llama_lora = models("llama:lora_c", r=4, targets="all-linear", seed=81)
    qwen_lora = models("qwen2:lora_c", r=4, targets="all-linear", seed=82)
    _plan(llama, llama_lora)
    plan = _plan(qwen, qwen_lora)
    assert len(_entries(cache)) == 2
    assert plan.config["auto_map"]["AutoModelForCausalLM"] == "modeling_smile.SmileQwen2ForCausalLM"
    assert {m.name for m in plan.modules.values()} <= set(_fresh(qwen).linears)


def _edited(change):
    def damage(text: str) -> str:
        record = json.loads(text)
        change(record)
        return json.dumps(record)

    return damage


def _first(mapping: dict) -> list:
    return next(iter(mapping.values()))


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text[: len(text) // 2],  # cut short
        lambda text: "[]",
        _edited(lambda r: r.update(name=5)),
        _edited(lambda r: _first(r["linears"]).__setitem__(0, "64")),  # a size as a string
        _edited(lambda r: _first(r["linears"]).__setitem__(2, 1.0)),  # a layer index as a number
        _edited(lambda r: _first(r["shapes"]).__setitem__(0, True)),  # a size as a boolean
        _edited(lambda r: r["aliases"].update({"lm_head.weight": None})),
        _edited(lambda r: r.pop("shapes")),
    ],
)
def test_a_damaged_entry_is_ignored_and_rewritten(models, cache, damage):
    base, lora = models("llama"), models("llama:lora_c", r=4, targets="all-linear", seed=81)
    expected = _plan(base, lora).config
    [entry] = _entries(cache)
    text = entry.read_text()
    entry.write_text(damage(text))
    assert architecture.Architecture.from_record(_json_or_none(entry.read_text())) is None
    assert _plan(base, lora).config == expected
    assert entry.read_text() == text


def _json_or_none(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


def test_no_cache_when_disabled_or_unwritable(models, tmp_path, monkeypatch):
    base, lora = models("llama"), models("llama:lora_c", r=4, targets="all-linear", seed=81)
    monkeypatch.setenv("SMILE_STREAM_CACHE", "")
    assert smile_stream.sources.cache_folder() is None
    expected = _plan(base, lora).config
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("SMILE_STREAM_CACHE", str(blocked))
    assert _plan(base, lora).config == expected  # the cache cannot be written: the plan does not mind
    assert blocked.read_text() == "not a folder"


def test_remote_code_models_are_never_cached(models, cache, tmp_path):
    base, lora = models("llama"), models("llama:lora_c", r=4, targets="all-linear", seed=81)
    remote = Path(shutil.copytree(base, tmp_path / "remote"))
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    make_plan(str(remote), [("a", str(lora))], Options(gate_rank=2, trust_remote_code=True))
    assert _entries(cache) == []


def test_a_conversion_with_a_cached_architecture_never_imports_transformers(models, cache, tmp_path):
    base, lora = models("llama"), models("llama:lora_c", r=4, targets="all-linear", seed=81)
    _plan(base, lora)
    script = (
        "import sys\n"
        "from smile_stream.cli import main\n"
        "try:\n"
        f"    main(['convert', '--base', {str(base)!r}, '--expert', 'a={lora}', '--out', {str(tmp_path / 'out')!r}, '--quiet'])\n"
        "except SystemExit as exit:\n"
        "    assert not exit.code, exit.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('transformers', 'accelerate', 'peft')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
