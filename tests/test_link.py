"""`--base-files`: unchanged base files become output shards as hard links (or reflinks), copies
when neither is possible; inputs are never written through, and the folder stays a normal one."""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from oracle import lora_deltas, oracle_model

import smile_stream
from smile_stream import Options, convert
from smile_stream.errors import SmileError


@pytest.fixture
def inputs(models):
    return models("llama"), models("llama:lora_k", r=4, targets="all-linear", seed=80)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(folder: Path) -> dict:
    """Every input file's bytes and hard-link count."""
    return {p.name: (_digest(p), p.stat().st_nlink) for p in sorted(folder.iterdir()) if p.is_file()}


def _logits_match_oracle(base: Path, lora: Path, out: Path) -> None:
    deltas = lora_deltas(base, lora)
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = smile_stream.load_model(out)(ids).logits.double()
        expected = oracle_model(base, [{m: (d, None, 4) for m, d in deltas.items()}], 4, 1)(ids).logits
    torch.testing.assert_close(logits, expected, rtol=2e-4, atol=2e-4)


def test_hard_link_by_default_and_the_inputs_come_back_unchanged(inputs, tmp_path):
    base, lora = inputs
    private = shutil.copytree(base, tmp_path / "base")
    before = _state(private)
    out = tmp_path / "out"
    result = convert(str(private), [("a", str(lora))], out, Options(gate_rank=4), quiet=True)
    linked = out / result.plan.shards[0].filename
    assert linked.stat().st_ino == (private / "model.safetensors").stat().st_ino and linked.stat().st_nlink == 2
    written = sum(p.stat().st_size for p in out.glob("model-*.safetensors") if p.stat().st_nlink == 1)
    expert_bytes = sum(t.nbytes for s in result.plan.shards for t in s.tensors if t.module)
    assert written <= 1.05 * expert_bytes + 4096, "new disk: the expert tensors (and their headers) only"
    _logits_match_oracle(private, lora, out)
    assert smile_stream.verify(out)[0] == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.filename for s in result.plan.shards}
    # editing the base in place changes the output (shared bytes): verify says so
    os.utime(private / "model.safetensors", ns=(1, 2))
    problems = smile_stream.verify(out)[0]
    assert any("hard link" in p and "modified after the conversion" in p for p in problems), problems
    os.utime(private / "model.safetensors", ns=(1, linked.stat().st_mtime_ns))
    # --overwrite, and a leftover .partial that is a hard link to the base, never write through them
    os.link(private / "model.safetensors", out / (result.plan.shards[1].filename + ".partial"))
    convert(str(private), [("a", str(lora))], out, Options(gate_rank=2), overwrite=True, quiet=True)
    (out / "stale.partial").unlink(missing_ok=True)
    shards = sorted(out.glob("model-*.safetensors"))
    os.link(private / "model.safetensors", shards[-1].with_name(shards[-1].name + ".partial"))
    shards[-1].unlink()  # a lost shard: the rerun writes it again, over the linked .partial
    convert(str(private), [("a", str(lora))], out, Options(gate_rank=2), quiet=True)
    assert smile_stream.verify(out)[0] == []
    shutil.rmtree(out)
    assert _state(private) == before, "bytes and link counts of every input as before"


def test_copy_makes_an_independent_folder_with_the_same_bytes(inputs, tmp_path):
    base, lora = inputs
    linked, copied = tmp_path / "a" / "out", tmp_path / "b" / "out"
    convert(str(base), [("a", str(lora))], linked, Options(gate_rank=4), quiet=True)
    convert(str(base), [("a", str(lora))], copied, Options(gate_rank=4, base_files="copy"), quiet=True)
    for shard in sorted(copied.glob("model-*.safetensors")):
        assert shard.read_bytes() == (linked / shard.name).read_bytes() and shard.stat().st_nlink == 1
    journal = json.loads((copied / "smile-journal.json").read_text())
    assert all(entry["sha256"] for entry in journal["shards"].values()), "copies are read, hashed and checked"
    assert smile_stream.verify(copied)[0] == []


def test_no_link_no_reflink_falls_back_to_a_copy(inputs, tmp_path, monkeypatch):
    import smile_stream.write as write

    base, lora = inputs

    def no_link(*args, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def no_reflink(*args, **kwargs):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(write.os, "link", no_link)
    monkeypatch.setattr(write.fcntl, "ioctl", no_reflink)
    out = tmp_path / "out"
    convert(str(base), [("a", str(lora))], out, Options(gate_rank=4), quiet=True)
    assert all(p.stat().st_nlink == 1 for p in out.glob("model-*.safetensors"))
    assert smile_stream.verify(out)[0] == []
    _logits_match_oracle(base, lora, out)
    with pytest.raises(SmileError, match="--base-files link: .* can be neither hard-linked nor reflinked"):
        convert(str(base), [("a", str(lora))], tmp_path / "strict", Options(gate_rank=4, base_files="link"), quiet=True)
    assert not (tmp_path / "strict" / "model.safetensors.index.json").exists()


def test_reflink_when_hard_links_are_refused(inputs, tmp_path, monkeypatch):
    # Where a filesystem clones (btrfs, XFS) a refused hard link becomes a reflink; here the
    # clone ioctl is stood in for by a copy, and the method must be recorded as a reflink.
    import smile_stream.write as write

    base, lora = inputs

    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    def clone(dst: int, request: int, src: int) -> None:
        assert request == write.FICLONE
        os.sendfile(dst, src, 0, os.fstat(src).st_size)

    monkeypatch.setattr(write.os, "link", no_link)
    monkeypatch.setattr(write.fcntl, "ioctl", clone)
    out = tmp_path / "out"
    convert(str(base), [("a", str(lora))], out, Options(gate_rank=4), quiet=True)
    journal = json.loads((out / "smile-journal.json").read_text())
    assert [e["placed"] for e in journal["shards"].values() if "placed" in e] == ["reflink"]
    assert smile_stream.verify(out)[0] == []


def test_hub_cache_base_links_the_blob(inputs, tmp_path):
    base, lora = inputs
    snapshot = shutil.copytree(base, tmp_path / "hub" / "snapshots" / "rev")
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir()
    shutil.move(snapshot / "model.safetensors", blobs / "0123abcd")
    (snapshot / "model.safetensors").symlink_to(blobs / "0123abcd")
    out = tmp_path / "out"
    result = convert(str(snapshot), [("a", str(lora))], out, Options(gate_rank=4), quiet=True)
    first = out / result.plan.shards[0].filename
    assert not first.is_symlink() and first.stat().st_ino == (blobs / "0123abcd").stat().st_ino
    assert smile_stream.verify(out)[0] == []


def test_another_filesystem_copies_and_says_so(inputs, tmp_path):
    base, lora = inputs
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]).returncode:
        pytest.skip("needs root and tmpfs mounts")
    try:
        out = mount / "out"
        run = subprocess.run(
            [sys.executable, "-m", "smile_stream", "convert", "--base", str(base), "--expert", f"a={lora}", "--out", str(out), "--gate-rank", "4"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert "base files placed whole: 1 by copy (no hard link or reflink possible" in run.stderr
        assert smile_stream.verify(out)[0] == []
        _logits_match_oracle(base, lora, out)
        strict = subprocess.run(
            [sys.executable, "-m", "smile_stream", "convert", "--base", str(base), "--expert", f"a={lora}", "--out", str(mount / "strict"), "--gate-rank", "4", "--base-files", "link"],
            capture_output=True, text=True,
        )  # fmt: skip
        assert strict.returncode == 2 and "can be neither hard-linked nor reflinked" in strict.stderr
        assert "Traceback" not in strict.stderr
    finally:
        subprocess.run(["umount", str(mount)])


def test_dry_run_shows_what_is_linked_and_what_is_written(inputs, capsys):
    base, lora = inputs
    convert(str(base), [("a", str(lora))], "unused", Options(gate_rank=4), dry_run=True)
    said = capsys.readouterr().out
    assert "placed whole from the base (hard link, else reflink, else copy)" in said
    assert "written" in said
