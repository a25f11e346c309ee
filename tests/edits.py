"""Small edits of model folders for the bad-input and safety tests: copy, change one JSON field or
tensor, rewrite a safetensors header, and a digest to check that inputs were left untouched."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

from safetensors.torch import load_file, save_file


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_header(path: Path, fn) -> None:
    """Replace a safetensors file's header by fn(header text without padding); the data stays."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    text = fn(raw[8 : 8 + length].decode().rstrip())
    path.write_bytes(struct.pack("<Q", len(text)) + text.encode() + raw[8 + length :])
