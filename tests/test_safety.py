"""The promises a hostile or unlucky user tests: inputs never deleted, nothing run or read against
the user's choice, nothing leaked from outside the input folders, one writer per output folder,
resume only from the same input contents, plan-phase validation of what the run will hit, clean
errors for malformed fields, signals handled like Ctrl-C, and verify covering the metadata."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import synthetic
import torch
from click.testing import CliRunner
from edits import copy, digest, edit_header, edit_json, edit_tensors
from oracle import lora_deltas, oracle_model
from safetensors.torch import load_file, save_file

import smile_stream
from smile_stream import Options, SmileError, convert
from smile_stream.cli import main
from smile_stream.output import LOCK_FILE, OutputLock


def cli(*args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "smile_stream", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


def run_cli(*args) -> tuple[int, str]:
    """The command line in this process: (exit code, everything it printed)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def inputs(models):
    return models("llama"), models("llama:lora_rq", r=4, targets=["q_proj", "v_proj"], seed=40)


def quick(base, lora, out, overwrite=False, **options):
    return convert(str(base), [("a", str(lora))], out, Options(**{"gate_rank": 4, **options}), overwrite=overwrite, quiet=True)


# -- 1. inputs are never deleted -------------------------------------------------------------------


def test_output_folder_that_contains_an_input_is_refused(inputs, tmp_path, monkeypatch):
    base, lora = inputs
    project = tmp_path / "project"
    models = project / "models"
    local_base, local_lora = copy(base, models / "base"), copy(lora, models / "lora")
    before = digest(project)
    linked = tmp_path / "link-to-project"
    linked.symlink_to(project)
    monkeypatch.chdir(project)
    for out in (project, models, Path("."), linked, local_base, local_base / "sub"):
        for overwrite in (False, True):
            with pytest.raises(SmileError, match="contains the base|inside the input folder"):
                convert(str(local_base), [("a", str(local_lora))], out, Options(gate_rank=4), overwrite=overwrite, quiet=True)
    assert digest(project) == before and not (local_base / "sub").exists()
    # a hub-cache-like input whose files link into blobs under the output folder: the files count
    blobs = tmp_path / "store" / "blobs"
    snapshot = copy(base, tmp_path / "store" / "snapshots" / "rev")
    blobs.mkdir()
    shutil.move(snapshot / "model.safetensors", blobs / "abc")
    (snapshot / "model.safetensors").symlink_to(blobs / "abc")
    with pytest.raises(SmileError, match="contains the base"):
        quick(snapshot, lora, tmp_path / "store" / "blobs", overwrite=True)
    assert (blobs / "abc").is_file()


def test_overwrite_removes_only_what_a_conversion_wrote(inputs, tmp_path, capsys):
    base, lora = inputs
    out = tmp_path / "out"
    quick(base, lora, out)
    (out / "notes.txt").write_text("mine")
    (out / "drafts").mkdir()
    (out / "drafts" / "model-00001-of-00001.safetensors").write_text("mine too")
    convert(str(base), [("a", str(lora))], out, Options(gate_rank=2), overwrite=True)
    said = capsys.readouterr().err
    assert "--overwrite: removed 10 file(s) of the earlier conversion" in said and "README.md, config.json" in said
    assert "kept 2 it did not write: drafts/, notes.txt" in said
    assert (out / "notes.txt").read_text() == "mine" and (out / "drafts" / "model-00001-of-00001.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["smile"]["gate_rank"] == 2
    assert smile_stream.verify(out)[0] == []


def test_overwrite_never_empties_a_folder_no_conversion_made(inputs, tmp_path):
    base, lora = inputs
    for name, files in {"docs": {"report.txt": "x"}, "lookalike": {"config.json": "{}", "README.md": "mine"}}.items():
        folder = tmp_path / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        before = digest(folder)
        with pytest.raises(SmileError, match="no smile-stream run wrote.*--overwrite removes only"):
            quick(base, lora, folder, overwrite=True)
        assert digest(folder) == before and not (folder / LOCK_FILE).exists()
    # a journal that is not one smile-stream wrote does not make a folder ours
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "smile-journal.json").write_text(json.dumps({"shards": "all of them"}))
    (foreign / "data.bin").write_bytes(b"1")
    with pytest.raises(SmileError, match="smile-journal.json: the field 'format_version' is missing"):
        quick(base, lora, foreign, overwrite=True)
    assert (foreign / "data.bin").exists()


# -- 2. nothing run or unpickled against the user's choice: every field of its own type --------------


@pytest.mark.parametrize(
    "line, match",
    [
        ('trust_remote_code = "false"', "trust_remote_code is 'false' \\(a string\\), but it must be a boolean"),
        ('allow_pickle = "false"', "allow_pickle is 'false' \\(a string\\), but it must be a boolean"),
        ("gate_rank = 2.7", "gate_rank is 2.7 \\(a number\\), but it must be an integer"),
        ("top_k = true", "top_k is True \\(a boolean\\), but it must be an integer"),
        ('expert_rank = "8"', "--expert-rank '8': write an integer rank, or energy:F"),  # a string is only energy:F
        ("max_shard_size = 1.5", "max_shard_size is 1.5 \\(a number\\), but it must be an integer or a string"),
        ('base = 5\nout = "x"', "recipe .*: base is 5 \\(a integer\\), but it must be a string"),
        ('device = "banana"', "--device 'banana' is not a device"),
        ('device = "meta"', "--device 'meta': smile-stream computes on cpu or cuda"),
    ],
)
def test_recipe_values_take_only_their_own_type(inputs, tmp_path, line, match):
    base, lora = inputs
    remote = copy(base, tmp_path / "remote")
    edit_json(remote / "config.json", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"})
    (remote / "modeling_evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('ran')\n")
    recipe = tmp_path / "r.toml"
    head = "" if line.startswith("base") else f'base = "{remote}"\nout = "{tmp_path / "out"}"\n'
    recipe.write_text(f'{head}{line}\n\n[experts]\na = "{lora}"\n')
    code, said = run_cli("convert", recipe)
    assert code == 2 and "Traceback" not in said and "internal error" not in said
    assert re.search(match, said), said
    assert not (tmp_path / "ran").exists() and not (tmp_path / "out" / "model.safetensors.index.json").exists()


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"use_rslora": "true"}, "use_rslora is 'true' \\(a string\\), but it must be a boolean"),
        ({"use_dora": "false"}, "use_dora is 'false' \\(a string\\), but it must be a boolean"),
        ({"r": "abc"}, "r is 'abc' \\(a string\\), but it must be an integer"),
        ({"r": 4.0}, "r is 4.0 \\(a number\\), but it must be an integer"),
        ({"lora_alpha": None}, "lora_alpha is None \\(a null\\), but it must be a finite number"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern is \\['q_proj'\\] \\(a list\\)"),
        ({"rank_pattern": {"(": 4}}, "rank_pattern key: '\\(' is not a valid regular expression"),
        ({"alpha_pattern": {"q_proj": "8"}}, "alpha_pattern\\['q_proj'\\] is '8' \\(a string\\)"),
        ({"init_lora_weights": 1}, "init_lora_weights is 1 \\(a integer\\), but it must be a boolean .* or a string"),
        ({"peft_type": 7}, "peft_type is 7"),
    ],
)
def test_adapter_config_fields_take_only_their_own_type(refused, llama, lora, tmp_path, changes, match):
    odd = copy(lora, tmp_path / "odd")
    edit_json(odd / "adapter_config.json", **changes)
    refused(llama, [("o", odd)], match)


@pytest.mark.parametrize("pattern", ["(a+)+$", "(x|xx)*y", "((q_proj)*)*", "(.*)*", "a" * 2000])
def test_regex_that_could_backtrack_forever_is_refused_at_once(refused, llama, lora, tmp_path, pattern):
    odd = copy(lora, tmp_path / "odd")
    edit_json(odd / "adapter_config.json", rank_pattern={pattern: 4})
    start = time.perf_counter()
    refused(llama, [("o", odd)], "could take exponential time")
    assert time.perf_counter() - start < 30


def test_plain_patterns_still_work(inputs, tmp_path):
    base, lora = inputs
    plain = copy(lora, tmp_path / "plain")
    edit_json(
        plain / "adapter_config.json", rank_pattern={".*layers\\.(0|1)\\.self_attn\\.q_proj": 4}, alpha_pattern={"v_proj": 8}
    )
    quick(base, plain, tmp_path / "out")
    assert smile_stream.verify(tmp_path / "out", deep=True)[0] == []


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"architectures": 5}, "config.json: architectures is 5 \\(a integer\\)"),
        ({"architectures": [5]}, "architectures is \\[5\\]; smile-stream needs a transformers model class"),
        ({"auto_map": "modeling_evil.Evil"}, "config.json: auto_map is 'modeling_evil.Evil' \\(a string\\)"),
    ],
)
def test_config_fields_take_only_their_own_type(refused, llama, lora, tmp_path, changes, match):
    odd = copy(llama, tmp_path / "odd")
    edit_json(odd / "config.json", **changes)
    refused(odd, [("a", lora)], match)


def test_index_and_journal_fields(inputs, tmp_path):
    base, lora = inputs
    odd = copy(base, tmp_path / "odd_index")
    keys = list(load_file(base / "model.safetensors"))
    (odd / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, 5)}))
    with pytest.raises(SmileError, match="weight_map must be a non-empty object of tensor name -> shard file name"):
        quick(odd, lora, tmp_path / "o1")
    for journal, match in [
        ({"format_version": 2, "plan_hash": "x", "record": [], "shards": {}}, "record is \\[\\] \\(a list\\)"),
        ({"format_version": 2, "plan_hash": "x", "record": {}, "shards": {"s": "done"}}, "shards\\['s'\\] is 'done'"),
        ({"format_version": 2, "plan_hash": 1, "record": {}, "shards": {}}, "plan_hash is 1"),
        (
            {"format_version": 2, "plan_hash": "x", "record": {}, "shards": {"s": {"sha256": "a", "size": "9"}}},
            "size is '9' \\(a string\\)",
        ),
    ]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        out.mkdir()
        (out / "smile-journal.json").write_text(json.dumps(journal))
        with pytest.raises(SmileError, match=match):
            quick(base, lora, out)


# -- 3. nothing read from outside the input folders ------------------------------------------------


def test_files_outside_the_input_folders_are_never_read(refused, llama, lora, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(llama / "model.safetensors", elsewhere / "model.safetensors")
    cases = {}
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json", "config.json"):
        folder = copy(llama, tmp_path / f"leak_{name}")
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(secret if name != "config.json" else llama / "config.json")
        cases[folder] = name
    for folder, name in cases.items():
        refused(folder, [("a", lora)], f"{name} is a symlink \\(or lies under one\\) leading out of the input folder")
    # a directory symlink inside the folder, named by the index
    via_dir = copy(llama, tmp_path / "via_dir")
    (via_dir / "model.safetensors").unlink()
    (via_dir / "sub").symlink_to(elsewhere)
    keys = list(load_file(llama / "model.safetensors"))
    (via_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": dict.fromkeys(keys, "sub/model.safetensors")})
    )
    refused(via_dir, [("a", lora)], "sub/model.safetensors is a symlink \\(or lies under one\\) leading out")
    # no index: a model.safetensors that links out
    linked = copy(llama, tmp_path / "linked")
    (linked / "model.safetensors").unlink()
    (linked / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    refused(linked, [("a", lora)], "model.safetensors is a symlink .* leading out")
    # an adapter's weights and config
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        adapter = copy(lora, tmp_path / f"lora_{name}")
        (tmp_path / f"moved_{name}").write_bytes((adapter / name).read_bytes())
        (adapter / name).unlink()
        (adapter / name).symlink_to(tmp_path / f"moved_{name}")
        refused(llama, [("a", adapter)], f"{name} is a symlink .* leading out of the input folder")


def test_links_that_stay_inside_the_folder_are_fine(inputs, tmp_path):
    base, lora = inputs
    folder = copy(base, tmp_path / "inside")
    (folder / "weights").mkdir()
    shutil.move(folder / "tokenizer.json", folder / "weights" / "tok.json")
    (folder / "tokenizer.json").symlink_to(folder / "weights" / "tok.json")
    quick(folder, lora, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (folder / "weights" / "tok.json").read_bytes()


# -- 4. one writer per output folder ---------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_stops(inputs, tmp_path):
    base, lora = inputs
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):
        with pytest.raises(SmileError, match=f"being written by another smile-stream run \\(pid {os.getpid()}\\)"):
            quick(base, lora, out)
        run = cli("convert", "--base", base, "--expert", f"a={lora}", "--out", out, "--gate-rank", "4")
        assert run.returncode == 2 and f"pid {os.getpid()}" in run.stderr and "Traceback" not in run.stderr
        assert not (out / "model.safetensors.index.json").exists()
    assert not (out / LOCK_FILE).exists()
    quick(base, lora, out)  # released: the run goes through, and leaves no lock file behind
    assert not (out / LOCK_FILE).exists() and smile_stream.verify(out)[0] == []


def test_concurrent_runs_never_both_finish(inputs, tmp_path):
    base, lora = inputs
    out = tmp_path / "out"
    args = ["convert", "--base", base, "--expert", f"a={lora}", "--out", out, "--gate-rank", "4", "--max-shard-size", "2KB"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "smile_stream", *map(str, args)], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    for code, said in results:
        assert code in (0, 2), said
        assert "internal error" not in said and "Traceback" not in said
        assert code == 0 or "being written by another smile-stream run" in said
    assert any(code == 0 for code, _ in results)
    final = cli(*args)  # whatever happened, the folder is finished by a run that held it alone
    assert final.returncode == 0, final.stderr
    assert smile_stream.verify(out)[0] == []


def test_a_failed_run_releases_the_lock(inputs, tmp_path):
    base, lora = inputs
    out = tmp_path / "out"
    with pytest.raises(SmileError):
        quick(base, lora, out, dtype="float16", targets="nothing_matches")
    out.mkdir(exist_ok=True)
    (out / "mine.txt").write_text("x")
    with pytest.raises(SmileError, match="no smile-stream run wrote"):
        quick(base, lora, out)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


# -- 5. resume notices changed weights; a repair never looks finished half-way ---------------------


def _resave_same_header(path: Path, key: str) -> None:
    """Change one value of a tensor in place: same header, same size, other content."""
    tensors = load_file(path)
    tensors[key] = tensors[key] * 1.5
    save_file(tensors, path, metadata={"format": "pt"})


def test_resume_refuses_inputs_saved_again_with_the_same_header(inputs, tmp_path, monkeypatch):
    base, lora = inputs
    adapter, local_base = copy(lora, tmp_path / "lora"), copy(base, tmp_path / "base")
    out = tmp_path / "out"
    convert(str(local_base), [("a", str(adapter))], out, Options(gate_rank=4, max_shard_size=20_000), quiet=True)
    (out / "model.safetensors.index.json").unlink()  # as if killed before the end
    key = next(k for k in load_file(adapter / "adapter_model.safetensors") if "lora_B" in k)
    header = (adapter / "adapter_model.safetensors").read_bytes()[:200]
    _resave_same_header(adapter / "adapter_model.safetensors", key)
    assert (adapter / "adapter_model.safetensors").read_bytes()[:200] == header
    with pytest.raises(SmileError, match="input files changed since it started .*adapter_model.safetensors"):
        convert(str(local_base), [("a", str(adapter))], out, Options(gate_rank=4, max_shard_size=20_000), quiet=True)
    # a large input is identified by size, mtime and inode: a touch is enough to refuse
    import smile_stream.sources

    monkeypatch.setattr(smile_stream.sources, "HASHED_INPUT_BYTES", 0)
    convert(str(local_base), [("a", str(adapter))], out, Options(gate_rank=4, max_shard_size=20_000), overwrite=True, quiet=True)
    (out / "model.safetensors.index.json").unlink()
    os.utime(local_base / "model.safetensors", ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(SmileError, match="changed since it started .*base/model.safetensors"):
        convert(str(local_base), [("a", str(adapter))], out, Options(gate_rank=4, max_shard_size=20_000), quiet=True)
    convert(str(local_base), [("a", str(adapter))], out, Options(gate_rank=4, max_shard_size=20_000), overwrite=True, quiet=True)
    assert smile_stream.verify(out, deep=True)[0] == []


def test_a_repair_that_stops_half_way_never_looks_finished(inputs, tmp_path):
    base, lora = inputs
    args = ["convert", "--base", base, "--expert", f"a={lora}", "--gate-rank", "4", "--max-shard-size", "2KB"]
    out = tmp_path / "out"
    assert cli(*args, "--out", out).returncode == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 3
    shards[2].unlink()  # lost: the folder is broken, and a rerun repairs it
    killed = cli(*args, "--out", out, env={"SMILE_STREAM_CRASH_AT": "shard-3-mid"})
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "model.safetensors.index.json").exists()
    with pytest.raises(SmileError, match="unfinished"):
        smile_stream.load_model(out)
    assert cli(*args, "--out", out).returncode == 0
    assert smile_stream.verify(out)[0] == []


# -- 6. the plan catches what the run would hit ----------------------------------------------------


def test_lora_rank_above_the_module_width_converts_exactly(models, tmp_path):
    base = models("llama")
    wide = synthetic.make_lora(tmp_path / "wide", base, r=80, targets=["q_proj", "k_proj"], seed=60)
    out = tmp_path / "out"
    convert(str(base), [("w", str(wide))], out, Options(gate_rank=4), quiet=True)
    ranks = {n: s["ranks"] for n, s in json.loads((out / "config.json").read_text())["smile"]["modules"].items()}
    assert ranks["model.layers.0.self_attn.q_proj"] == [64] and ranks["model.layers.0.self_attn.k_proj"] == [32]
    deltas = lora_deltas(base, wide)
    oracle = oracle_model(base, [{m: (d, None, min(d.shape)) for m, d in deltas.items()}], 4, 1)
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(smile_stream.load_model(out)(ids).logits.double(), oracle(ids).logits, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.float8_e4m3fn])
def test_non_float_target_weights_are_refused(refused, llama, lora, tmp_path, dtype):
    odd = copy(llama, tmp_path / "odd")
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_tensors(odd / "model.safetensors", lambda t: t.update({name: t[name].to(dtype)}))
    refused(odd, [("a", lora)], f"target tensor '{name}' is .*, not floating point")


def test_non_float_lora_factors_are_refused(refused, llama, lora, tmp_path):
    odd = copy(lora, tmp_path / "odd")
    edit_tensors(odd / "adapter_model.safetensors", lambda t: t.update({k: t[k].to(torch.int8) for k in t if "lora_A" in k}))
    refused(llama, [("a", odd)], "lora_A/lora_B of dtype I8/F32; LoRA factors must be floating point")


def _duplicate_first(header: str) -> str:
    entries = json.loads(header)
    name = next(n for n in entries if n != "__metadata__")
    return header[:-1] + "," + json.dumps(name) + ":" + json.dumps(entries[name]) + "}"


def _overlap_norms(header: str) -> str:
    entries = json.loads(header)  # two same-shaped tensors pointing at the same bytes
    first, second = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    entries[second]["data_offsets"] = entries[first]["data_offsets"]
    return json.dumps(entries)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda h: h.replace('"data_offsets":[0,', '"data_offsets":[0.0,', 1), "malformed header entry"),
        (lambda h: h.replace('{"format":"pt"}', '{"format":5}'), "__metadata__ must map names to strings"),
        (lambda h: h.replace('"shape":[', '"shape":[-', 1), "malformed header entry"),
        (_duplicate_first, "appears more than once"),
        (_overlap_norms, "tensors overlap or leave a hole"),
    ],
    ids=["float-offset", "metadata-int", "negative-shape", "duplicate-key", "overlap"],
)
def test_headers_as_strict_as_the_safetensors_library(refused, llama, lora, tmp_path, edit, match):
    odd = copy(llama, tmp_path / "odd")
    edit_header(odd / "model.safetensors", edit)
    refused(odd, [("a", lora)], match)


def test_values_that_do_not_fit_float16_are_named(refused, llama, lora, full, tmp_path):
    big = copy(llama, tmp_path / "big")
    edit_tensors(big / "model.safetensors", lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    refused(big, [("a", lora)], "tensor 'model.norm.weight' has values up to 1e\\+06, which do not fit float16", dtype="float16")
    loud = copy(full, tmp_path / "loud")
    name = "model.layers.1.mlp.up_proj.weight"
    edit_tensors(loud / "model.safetensors", lambda t: t[name].__setitem__((0, 0), 3e5))
    refused(
        llama,
        [("f", loud)],
        "expert factors of model.layers.1.mlp.up_proj has values up to .* do not fit float16",
        dtype="float16",
    )


def test_tied_base_whose_expert_changed_lm_head_is_reported(tmp_path):
    base = synthetic.make_base(tmp_path / "tied", "llama", seed=3)
    edit_json(base / "config.json", tie_word_embeddings=True)
    edit_tensors(base / "model.safetensors", lambda t: t.pop("lm_head.weight"))
    expert = copy(base, tmp_path / "expert")
    name = "model.layers.0.mlp.up_proj.weight"

    def change(t):
        t[name] = t[name] + 0.01
        t["lm_head.weight"] = t["model.embed_tokens.weight"] * 1.1

    edit_tensors(expert / "model.safetensors", change)
    for non_linear in ("base", "average"):
        result = convert(
            str(base), [("e", str(expert))], tmp_path / non_linear, Options(gate_rank=4, non_linear=non_linear), quiet=True
        )
        notes = "\n".join(smile_stream.report.non_target_notes(result.plan))
        assert "lm_head.weight differs in e (10.00%): dropped: the base ties it to model.embed_tokens.weight" in notes
        assert smile_stream.verify(tmp_path / non_linear)[0] == []


def test_convert_never_finishes_a_folder_verify_rejects(refused, llama, lora, models, tmp_path):
    wrong_vocab = copy(llama, tmp_path / "vocab")
    edit_json(wrong_vocab / "config.json", vocab_size=300)
    refused(
        wrong_vocab,
        [("a", lora)],
        "weights do not match the model config.json describes: tensor model.embed_tokens.weight has shape \\[320, 64\\] but the config implies \\[300, 64\\]",
    )
    missing = copy(llama, tmp_path / "missing")
    edit_tensors(missing / "model.safetensors", lambda t: t.pop("model.norm.weight"))
    refused(missing, [("a", lora)], "tensor model.norm.weight \\[64\\] is missing")
    # old checkpoints carry buffers the model no longer saves: left out, with a note, and verify agrees
    buffers = copy(llama, tmp_path / "buffers")
    extra = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in range(2)}
    edit_tensors(buffers / "model.safetensors", lambda t: t.update(extra))
    result = quick(buffers, lora, tmp_path / "out")
    notes = "\n".join(smile_stream.report.non_target_notes(result.plan))
    assert "base tensor model.layers.0.self_attn.rotary_emb.inv_freq is left out of the output" in notes
    assert smile_stream.verify(tmp_path / "out")[0] == []


# -- 7. malformed fields and files: exit 2 and a message, never an internal error --------------------


def test_complex_tensor_in_an_allowed_pickle(refused, llama, lora, tmp_path, monkeypatch):
    monkeypatch.setenv("SMILE_STREAM_CACHE", str(tmp_path / "cache"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(llama / "config.json", pickled)
    state = load_file(llama / "model.safetensors")
    state["odd"] = torch.zeros(3, dtype=torch.complex64)
    torch.save(state, pickled / "pytorch_model.bin")
    refused(pickled, [("a", lora)], "tensor 'odd' has dtype torch.complex64", allow_pickle=True)


def test_verify_on_broken_files_exits_2_naming_them(inputs, tmp_path):
    base, lora = inputs
    good = tmp_path / "good"
    quick(base, lora, good, max_shard_size=120_000)
    second = sorted(good.glob("model-*.safetensors"))[1].name
    breakages = {
        "config": (lambda f: (f / "config.json").write_text("{not json"), "config.json: the model config is not valid JSON"),
        "smile": (
            lambda f: edit_json(f / "config.json", smile={**json.loads((f / "config.json").read_text())["smile"], "modules": []}),
            "smile: modules is \\[\\] \\(a list\\)",
        ),
        "ranks": (
            lambda f: edit_json(
                f / "config.json",
                smile={
                    **(s := json.loads((f / "config.json").read_text())["smile"]),
                    "modules": {k: {**v, "ranks": ["4"]} for k, v in s["modules"].items()},
                },
            ),
            "ranks is '4' \\(a string\\), but it must be an integer",
        ),
        "index": (lambda f: (f / "model.safetensors.index.json").write_text("[]"), "the weights index is not a JSON object"),
        "index-values": (
            lambda f: edit_json(f / "model.safetensors.index.json", weight_map={"x": 3}),
            "weight_map\\['x'\\] is 3",
        ),
        "empty-shard": (lambda f: (f / second).write_bytes(b""), f"{second} is not a valid safetensors file"),
        "journal": (
            lambda f: edit_json(f / "smile-journal.json", shards=[]),
            "smile-journal.json: shards is \\[\\] \\(a list\\)",
        ),
    }
    for name, (breakage, match) in breakages.items():
        folder = copy(good, tmp_path / name)
        breakage(folder)
        code, said = run_cli("verify", folder)
        assert code == 2 and "internal error" not in said and re.search(match, said), (name, said)


# -- 8. SIGTERM and SIGHUP are handled like Ctrl-C ---------------------------------------------------


@pytest.mark.parametrize("signame, point", [("SIGTERM", "shard-2-mid"), ("SIGHUP", "shard-3-renamed"), ("SIGTERM", "index")])
def test_termination_signals_clean_up_and_resume(inputs, tmp_path, signame, point):
    base, lora = inputs
    args = ["convert", "--base", base, "--expert", f"a={lora}", "--gate-rank", "4", "--max-shard-size", "2KB"]
    reference = tmp_path / "ref" / "out"
    assert cli(*args, "--out", reference).returncode == 0
    out = tmp_path / "out"
    stopped = cli(*args, "--out", out, env={"SMILE_STREAM_CRASH_AT": point, "SMILE_STREAM_CRASH_SIGNAL": signame})
    signum = signal.Signals[signame]
    assert stopped.returncode == 128 + signum, stopped.stderr
    assert f"interrupted ({signame}). Run the same command again to resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not list(out.glob("*.partial")) and not (out / "model.safetensors.index.json").exists()
    assert not (out / LOCK_FILE).exists()
    assert cli(*args, "--out", out).returncode == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in reference.iterdir()}


def test_atomic_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    from smile_stream.output import atomic_write

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "config.json", b"{}")
    assert list(tmp_path.iterdir()) == []


# -- 9. verify covers the config's smile section and the remote code ---------------------------------


def test_verify_notices_edited_metadata(inputs, tmp_path):
    base, lora = inputs
    good = tmp_path / "good"
    quick(base, lora, good)
    assert smile_stream.verify(good)[0] == []
    edits = {
        "gate-rank": (
            lambda f: edit_json(
                f / "config.json", smile={**json.loads((f / "config.json").read_text())["smile"], "gate_rank": 2}
            ),
            "config.json differs",
        ),
        "remote-code": (
            lambda f: (f / "modeling_smile.py").write_text((f / "modeling_smile.py").read_text() + "\nimport os\n"),
            "modeling_smile.py differs",
        ),
        "tokenizer": (lambda f: (f / "tokenizer.json").unlink(), "tokenizer.json is missing"),
        "old-journal": (
            lambda f: (f / "smile-journal.json").write_text(
                json.dumps({k: v for k, v in json.loads((f / "smile-journal.json").read_text()).items() if k != "metadata"})
            ),
            "has no digest of config.json",
        ),
    }
    for name, (edit, match) in edits.items():
        folder = copy(good, tmp_path / name)
        edit(folder)
        problems, _ = smile_stream.verify(folder)
        assert any(match in p for p in problems), (name, problems)


def test_computed_tensors_are_checked_where_they_are_made():
    # every tensor the writer does not copy passes tensors.cast: overflow and damage told apart
    from smile_stream.tensors import cast

    with pytest.raises(SmileError, match="x has values up to 7e\\+04, which do not fit float16"):
        cast(torch.tensor([1.0, 7e4]), torch.float16, "x")
    with pytest.raises(SmileError, match="y: the computed tensor holds NaN or Inf"):
        cast(torch.tensor([1.0, float("nan")]), torch.float16, "y")
    assert cast(torch.tensor([1.5, -2.0]), torch.bfloat16, "z").tolist() == [1.5, -2.0]  # a fitting cast passes untouched
