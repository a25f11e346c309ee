"""Crash safety and resume: SIGKILL at every stage, disk full, changed inputs, byte-identical output."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import smile_stream
from smile_stream import Options, SmileError, convert
from smile_stream.plan import record_hash


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "smile_stream", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture(scope="module")
def job(models, tmp_path_factory):
    """A conversion with LoRA and full experts over several shards, and its uninterrupted output."""
    base = models("llama")
    experts = [
        ("full", models("llama:full_0", seed=20)),
        ("qv", models("llama:lora_rq", r=4, targets=["q_proj", "v_proj"], seed=40)),
        ("all", models("llama:lora_ra", r=8, targets="all-linear", seed=41)),
    ]
    args = [
        "convert",
        "--base",
        base,
        *[a for n, p in experts for a in ("--expert", f"{n}={p}")],
        "--gate-rank",
        "4",
        "--expert-rank",
        "8",
        "--svd",
        "randomized",
        "--max-shard-size",
        "60KB",
    ]
    reference = tmp_path_factory.mktemp("reference") / "out"
    run = cli(*args, "--out", reference)
    assert run.returncode == 0, run.stderr
    return args, reference


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reference_has_several_shards(job):
    _, reference = job
    assert len(list(reference.glob("model-*.safetensors"))) >= 5


@pytest.mark.parametrize(
    "point", ["plan", "metadata", "shard-1-mid", "shard-3-mid", "shard-2-renamed", "shard-4-renamed", "index"]
)
def test_kill_then_resume_is_byte_identical(job, tmp_path, point):
    args, reference = job
    out = tmp_path / "out"  # same folder name as the reference: the model card names it
    killed = cli(*args, "--out", out, env={"SMILE_STREAM_CRASH_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if out.exists():
        assert not (out / "model.safetensors.index.json").exists()
        with pytest.raises(SmileError, match="unfinished"):
            smile_stream.load_model(out)
        problems, _ = smile_stream.verify(out)
        assert any("unfinished" in p for p in problems)
    journaled = json.loads((out / "smile-journal.json").read_text())["shards"] if (out / "smile-journal.json").exists() else {}
    if point.startswith("shard-"):  # shards are committed in the background: at most the earlier ones are done
        assert len(journaled) <= int(point.split("-")[1]) - (1 if point.endswith("-mid") else 0)
    resumed = cli(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    # every shard the journal had recorded is kept, not recomputed
    assert resumed.stderr.count("kept (already written)") == len(journaled)

    assert files(out) == files(reference)
    assert smile_stream.verify(out)[0] == []


def test_rerun_of_finished_output_recomputes_nothing(job, tmp_path):
    args, reference = job
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    again = cli(*args, "--out", out)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("kept (already written)") == len(list(reference.glob("model-*.safetensors")))
    assert files(out) == files(reference)


def test_changed_option_or_input_is_refused(job, models, tmp_path):
    args, reference = job
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "model.safetensors.index.json").unlink()  # unfinished
    changed = cli(*args[:-2], "--max-shard-size", "80KB", "--out", out)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert "option max_shard_size: 60000 -> 80000" in changed.stderr and "--overwrite" in changed.stderr
    # an input file changed: a copy of an adapter with one value altered
    lora = tmp_path / "lora"
    shutil.copytree(models("llama:lora_rq", r=4, targets=["q_proj", "v_proj"], seed=40), lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 3}))
    swapped = [a if not a.startswith("qv=") else f"qv={lora}" for a in map(str, args)]
    refused = cli(*swapped, "--out", out)
    assert refused.returncode == 2 and "expert qv: " in refused.stderr
    redo = cli(*swapped, "--out", out, "--overwrite")
    assert redo.returncode == 0, redo.stderr
    assert smile_stream.verify(out)[0] == []


def test_output_folder_guards(models, tmp_path):
    base = models("llama")
    lora = models("llama:lora_rq", r=4, targets=["q_proj", "v_proj"], seed=40)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(SmileError, match="already holds files that no smile-stream run wrote \\(notes.txt\\)"):
        convert(str(base), [("a", str(lora))], busy, Options(gate_rank=4), quiet=True)
    assert (busy / "notes.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    with pytest.raises(SmileError, match="inside the input folder"):
        convert(str(base), [("a", str(lora))], base / "smile", Options(gate_rank=4), quiet=True)
    assert not (base / "smile").exists()


def test_two_runs_are_byte_identical(models, tmp_path):
    base = models("qwen2")
    experts = [("f", str(models("qwen2:full_0", seed=20))), ("l", str(models("qwen2:lora_d", r=4, seed=42)))]
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name / "out"
        convert(str(base), experts, out, Options(gate_rank=4, expert_rank=8, svd="randomized"), quiet=True)
        outs.append(files(out))
    assert outs[0] == outs[1]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode
        == 0
    )


def test_disk_full_then_resume(job, tmp_path):
    args, reference = job
    mount = tmp_path / "small"
    first = sorted(reference.glob("model-*.safetensors"))[0].stat().st_size  # the base file, copied (tmpfs: no links)
    if not _mount_tmpfs(mount, f"{first // 1024 + 110}k"):  # it and the metadata fit, the rest does not
        pytest.skip("needs root and tmpfs mounts")
    try:
        out = mount / "out"
        full = cli(*args, "--out", out)
        assert full.returncode == 2 and "Traceback" not in full.stderr
        assert "disk holding" in full.stderr and "is full" in full.stderr and "run the same command again" in full.stderr
        assert not (out / "model.safetensors.index.json").exists()
        assert not list(out.glob("*.partial"))
        subprocess.run(["mount", "-o", "remount,size=4m", str(mount)], check=True)
        resumed = cli(*args, "--out", out)
        assert resumed.returncode == 0, resumed.stderr
        assert "kept (already written)" in resumed.stderr
        # the journal says how the base file got there: copied onto the tmpfs, hard-linked in the reference
        ignore = {"smile-journal.json"}
        assert {k: v for k, v in files(out).items() if k not in ignore} == {
            k: v for k, v in files(reference).items() if k not in ignore
        }
    finally:
        subprocess.run(["umount", str(mount)])


def test_read_only_output(models, tmp_path):
    mount = tmp_path / "ro"
    if not _mount_tmpfs(mount, "1m"):
        pytest.skip("needs root and tmpfs mounts")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        run = cli(
            "convert",
            "--base",
            models("llama"),
            "--expert",
            f"a={models('llama:lora_rq', r=4, targets=['q_proj', 'v_proj'], seed=40)}",
            "--out",
            mount / "out",
        )
        assert run.returncode == 2 and "cannot be written" in run.stderr and "Traceback" not in run.stderr
    finally:
        subprocess.run(["umount", str(mount)])


def test_outputs_of_an_older_format(job, tmp_path):
    # A folder from a version that packed the experts differently: resuming it is refused with
    # the reason, and the package's loaders refuse it instead of misreading its factors.
    args, reference = job
    unfinished = tmp_path / "unfinished"
    shutil.copytree(reference, unfinished)
    (unfinished / "model.safetensors.index.json").unlink()
    journal = json.loads((unfinished / "smile-journal.json").read_text())
    journal["record"]["format_version"] = 1
    journal["plan_hash"] = record_hash(journal["record"])

    (unfinished / "smile-journal.json").write_text(json.dumps(journal))
    refused = cli(*args, "--out", unfinished)
    assert refused.returncode == 2 and "output format version 1 -> 2" in refused.stderr

    finished = tmp_path / "finished"
    shutil.copytree(reference, finished)
    config = json.loads((finished / "config.json").read_text())
    config["smile"]["format_version"] = 1
    (finished / "config.json").write_text(json.dumps(config))
    with pytest.raises(SmileError, match="holds SMILE format 1, and this code reads format 2"):
        smile_stream.load_model(finished)
    problems, _ = smile_stream.verify(finished)
    assert len(problems) == 1 and "SMILE format 1" in problems[0]
