"""Sources: find model folders (local or hub), read their configs, weights headers and PEFT adapters.

Nothing here reads tensor data except `read_tensor`, which goes through `safe_open` (mmap), one
tensor at a time. Pickle files are never opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from . import fields
from .errors import SmileError
from .tensors import (
    DTYPE_CODES,
    FLOAT_CODES,
    TensorInfo,
    nonfinite_error,
    read_safetensors_header,
    require_finite,
    safetensors_header,
    value_range,
)

INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_json(path: Path, what: str) -> dict:
    """A JSON object from an input or output file, or a SmileError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SmileError(f"{path}: the {what} is not valid JSON ({exc}). Fix or re-download it.") from None
    if not isinstance(data, dict):
        raise SmileError(f"{path}: the {what} is not a JSON object. Fix or re-download it.")
    return data


def input_path(folder: Path, name: str, what: str = "file") -> Path:
    """`folder / name`, refused unless it resolves inside `folder`, symlinks followed at every depth.

    Every file smile-stream reads from an input folder goes through here: weights, configs, and
    the tokenizer and other files it copies into the output (which users then upload). A hub cache
    snapshot's links into its own `blobs/` are allowed. A name that does not exist is returned as
    is (callers check `is_file()`).
    """
    if os.path.isabs(name) or ".." in Path(name).parts:
        raise SmileError(
            f"{folder}: {what} {name!r} points outside the model folder. Refusing to read it; fix the file that names "
            "it so that it names files inside the folder."
        )
    path = folder / name
    if not os.path.lexists(path):
        return path
    real, root = path.resolve(), folder.resolve()
    hub_blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    if real.is_relative_to(root) or (hub_blobs is not None and real.is_relative_to(hub_blobs)):
        return path
    raise SmileError(
        f"{path} is a symlink (or lies under one) leading out of the input folder {folder}, to {real}. smile-stream reads "
        "only files inside its input folders, so that nothing from elsewhere reaches the output; copy the file into the "
        "folder instead of linking it."
    )


class Checkpoint:
    """A Hugging Face model folder: config.json plus safetensors weights (one file, or shards + index)."""

    def __init__(self, folder: Path, source: str, allow_pickle: bool = False):
        self.folder, self.source, self.allow_pickle = folder, source, allow_pickle
        config_path = input_path(folder, "config.json")
        if not config_path.is_file():
            raise SmileError(
                f"{folder} has neither config.json (a model) nor adapter_config.json (a LoRA adapter). Point to the "
                "folder that holds config.json and the *.safetensors weights, or to the adapter's folder."
            )

        self.config = load_json(config_path, "model config")
        self.read_paths = [config_path]  # every input file this run depends on, for resume to notice changes
        self.files = [read_safetensors_header(p) for p in self._weight_files()]
        self.tensors: dict[str, TensorInfo] = {}
        for file in self.files:
            self.tensors.update(file.tensors)
        self._handles: dict[str, object] = {}

    def _weight_files(self) -> list[Path]:
        index = input_path(self.folder, INDEX_FILE)
        if index.is_file():
            weight_map = load_json(index, "weights index").get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
                raise SmileError(
                    f"{index}: weight_map must be a non-empty object of tensor name -> shard file name; the index is "
                    "corrupted. Re-download or re-save the model."
                )
            files = [input_path(self.folder, name, "the shard") for name in sorted(set(weight_map.values()))]
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise SmileError(f"{index} names shards that are not in the folder: {missing}. Download the missing files.")
            self.read_paths += [index, *files]
            return files
        files = [input_path(self.folder, p.name) for p in sorted(self.folder.glob("*.safetensors"))]
        if files:
            self.read_paths += files
            return files
        # weights only: training_args.bin, optimizer.pt and rng_state.pth are pickles too, but not weights
        pickles = sorted(
            input_path(self.folder, p.name)
            for p in self.folder.iterdir()
            if re.fullmatch(r"(pytorch_)?model.*\.(bin|pt|pth)", p.name)
        )
        if pickles:
            if self.allow_pickle:
                self.read_paths += pickles
                return [unpickled(p) for p in pickles]
            raise SmileError(
                f"{self.folder} holds only pickle weights ({', '.join(p.name for p in pickles)}). smile-stream reads "
                "safetensors by default, since unpickling can run code from the file. Pass --allow-pickle to load them "
                "with torch.load(weights_only=True) into a safetensors copy, or convert them yourself."
            )
        raise SmileError(f"{self.folder} has a config.json but no *.safetensors weights. Download or save the weights into it.")

    @cached_property
    def fingerprint(self) -> list:
        """Names, sizes and header digests: what the plan hash covers for this input."""
        return [[os.path.basename(f.path), f.size, f.header_sha256] for f in self.files]

    def read(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped through safe_open; NaN or Inf is refused."""
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = safe_open(info.file, framework="pt", device="cpu")
        return require_finite(handle.get_tensor(name), info)


def _pattern_value(patterns: dict, module: str, default):
    # peft's rule: the first key that matches a dotted suffix of the module name wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: delta W = scale * B @ A with A (r, in), B (out, r); with DoRA, also the
    learned magnitude (out,) the adapted weight's rows are rescaled to."""

    a: TensorInfo
    b: TensorInfo
    rank: int
    scale: float
    magnitude: TensorInfo | None = None


_EMBEDDING = "LoRA on embeddings changes an embedding table, not a linear layer"
_SAVED_MODULES = "modules_to_save replaces whole modules instead of adding a low-rank delta"
# adapter_config.json fields and adapter tensor-name markers of adapters that are not plain low-rank deltas
_UNSUPPORTED_ADAPTER_FIELDS = {
    "modules_to_save": _SAVED_MODULES,
    "lora_bias": "LoRA with a trained bias (lora_bias) changes biases, which a LoRA expert cannot carry",
}
# adapter_config.json fields read here, with the JSON types peft writes them with
_TYPED_ADAPTER_FIELDS = {
    "r": "int",
    "lora_alpha": "number",
    "use_rslora": "bool",
    "use_dora": "bool",
    "lora_bias": "bool",
    "fan_in_fan_out": "bool",
    "init_lora_weights": "bool|str",
    "modules_to_save": "list|null",
    "loftq_config": "dict|null",
    "rank_pattern": "dict|null",
    "alpha_pattern": "dict|null",
}
_UNSUPPORTED_ADAPTER_KEYS = {
    "lora_embedding_A": _EMBEDDING,
    "lora_embedding_B": _EMBEDDING,
    "modules_to_save": _SAVED_MODULES,
}


class LoraAdapter:
    """A PEFT LoRA adapter folder: adapter_config.json + adapter_model.safetensors."""

    def __init__(self, folder: Path, source: str, allow_pickle: bool = False):
        self.folder, self.source = folder, source
        config_path = input_path(folder, ADAPTER_CONFIG)
        self.config = load_json(config_path, "adapter config")
        weights = input_path(folder, ADAPTER_WEIGHTS)
        pickled = input_path(folder, "adapter_model.bin")
        self.read_paths = [config_path, weights if weights.is_file() else pickled]
        if not weights.is_file() and pickled.is_file() and allow_pickle:
            weights = unpickled(pickled)
        elif not weights.is_file():
            hint = (
                " It has adapter_model.bin: pass --allow-pickle to read it with torch.load(weights_only=True)."
                if pickled.is_file()
                else ""
            )
            raise SmileError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}.{hint}")

        self.file = read_safetensors_header(weights)
        self._check_config()
        self.dora = self.config.get("use_dora") is True
        self.modules = self._modules()
        self._handle = None
        self._zero: dict[str, bool] = {}  # tensors checked finite (the plan and the factoring both read them): all zero?

    def _check_config(self) -> None:
        cfg, where = self.config, self.folder / ADAPTER_CONFIG
        peft_type = fields.get(cfg, "peft_type", "str", where, "LORA")
        if peft_type != "LORA":
            raise SmileError(f"{where}: peft_type is {peft_type!r}; smile-stream converts LoRA adapters only.")
        for key, kinds in _TYPED_ADAPTER_FIELDS.items():
            fields.get(cfg, key, kinds, where, None)
        for key, why in _UNSUPPORTED_ADAPTER_FIELDS.items():
            if cfg.get(key):
                raise SmileError(
                    f"{where}: {key} is set. {why}; smile-stream refuses such adapters. Merge it into a full fine-tune and pass that folder as the expert instead."
                )
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower() not in ("gaussian", "true"):
            raise SmileError(
                f"{where}: init_lora_weights is {init!r}. Such adapters (PiSSA, OLoRA, LoftQ, CorDA, EVA...) also "
                "change the base weights, so base + B @ A is not the fine-tuned model. Convert the adapter to a plain "
                "LoRA first (peft's `save_pretrained(..., path_initial_model_for_weight_conversion=...)`) or merge it."
            )
        if cfg.get("loftq_config"):
            raise SmileError(
                f"{where}: loftq_config is set; LoftQ adapters change the base weights. Merge the adapter and pass the full model instead."
            )
        for key, kinds in (("rank_pattern", "int"), ("alpha_pattern", "number")):
            for pattern, value in (cfg.get(key) or {}).items():
                fields.safe_regex(pattern, f"{where}: {key} key")
                fields.check(value, kinds, f"{where}: {key}[{pattern!r}]")

    def _modules(self) -> dict[str, LoraModule]:
        where = self.folder / ADAPTER_WEIGHTS
        pairs: dict[str, dict[str, TensorInfo]] = {}
        for key, info in self.file.tensors.items():
            for marker, why in _UNSUPPORTED_ADAPTER_KEYS.items():
                if marker in key:
                    raise SmileError(f"{where}: tensor {key!r}: {why}; smile-stream refuses such adapters.")
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key) or re.fullmatch(
                r"(?:base_model\.model\.)?(.+)\.lora_(magnitude)_vector(?:\.[^.]+)?(?:\.weight)?", key
            )
            if match is None or (match.group(2) == "magnitude" and not self.dora):
                raise SmileError(
                    f"{where}: tensor {key!r} is not a lora_A/lora_B weight{' or a DoRA magnitude' if self.dora else ''}. "
                    "Only LoRA and DoRA adapters can be converted; biases and saved modules are refused"
                    f"{'' if self.dora else ', and DoRA magnitudes need use_dora = true in ' + ADAPTER_CONFIG}."
                )
            pairs.setdefault(match.group(1), {})[match.group(2)] = info
        cfg = self.config
        modules = {}
        for module, pair in sorted(pairs.items()):
            magnitude = pair.pop("magnitude", None)
            if self.dora and (magnitude is None or magnitude.shape != pair.get("B", magnitude).shape[:1]):
                raise SmileError(
                    f"{where}: module {module!r} of this DoRA adapter has no lora_magnitude_vector of one value per output "
                    "feature. The adapter is incomplete; save it again."
                )
            if set(pair) != {"A", "B"}:
                raise SmileError(
                    f"{where}: module {module!r} has lora_{'A' if 'A' in pair else 'B'} but no lora_{'B' if 'A' in pair else 'A'}. The adapter is incomplete; save it again."
                )
            a, b = pair["A"], pair["B"]
            if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
                raise SmileError(
                    f"{where}: module {module!r} has lora_A of shape {list(a.shape)} and lora_B of shape {list(b.shape)}; their ranks disagree. The adapter is corrupted."
                )
            rank = a.shape[0]
            if rank == 0 or 0 in a.shape or 0 in b.shape:
                raise SmileError(
                    f"{where}: module {module!r} has an empty lora_A or lora_B (shape {list(a.shape)}, {list(b.shape)}); the adapter is corrupted."
                )
            if a.dtype not in FLOAT_CODES or b.dtype not in FLOAT_CODES:
                raise SmileError(
                    f"{where}: module {module!r} has lora_A/lora_B of dtype {a.dtype}/{b.dtype}; LoRA factors must be floating "
                    "point (F32, F16, BF16 or F64). Quantized adapters are not supported: save it in float."
                )
            config_rank = _pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", rank))
            if config_rank != rank:
                raise SmileError(
                    f"{where}: module {module!r} has rank {rank} in its lora_A/lora_B tensors but {config_rank} in "
                    f"{ADAPTER_CONFIG} (r / rank_pattern). The scale alpha/r would be wrong; fix the config."
                )
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", rank)))
            scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") is True else alpha / rank
            modules[module] = LoraModule(a, b, rank, scale, magnitude)
        if not modules:
            raise SmileError(f"{where} holds no lora_A/lora_B tensors; the adapter is empty.")
        return modules

    @cached_property
    def fingerprint(self) -> list:
        return [[ADAPTER_WEIGHTS, self.file.size, self.file.header_sha256], self.config]

    def read(self, info: TensorInfo) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(self.file.path, framework="pt", device="cpu")
        tensor = self._handle.get_tensor(info.name)
        if info.name not in self._zero:
            low, high = value_range(tensor) if tensor.numel() else (0.0, 0.0)
            if not (math.isfinite(low) and math.isfinite(high)):
                raise nonfinite_error(info)
            self._zero[info.name] = low == high == 0
        return tensor

    def is_zero(self, info: TensorInfo) -> bool:
        """Whether every value of the tensor is zero (found by the same pass that checks it finite)."""
        if info.name not in self._zero:
            self.read(info)
        return self._zero[info.name]


HASH_CHUNK = 1 << 24
# Inputs up to this size are identified by their sha256 (adapters, configs, small models); larger
# ones by size, mtime and inode, since hashing a 15 GB base on every run costs more than it saves.
HASHED_INPUT_BYTES = 512 << 20
_DIGESTS: dict[tuple, Future] = {}  # (path, size, mtime, inode) -> the file's sha256, computed in the background


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _state(path: Path, stat: os.stat_result) -> tuple:
    return str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino


def digest_in_background(paths: list[Path]) -> None:
    """Start hashing the input files identified by content on a background thread, so that their
    sha256 (for the journal) costs no time of its own: the plan reads the same files meanwhile."""
    jobs = []
    for path in paths:
        stat = path.stat()
        if stat.st_size <= HASHED_INPUT_BYTES and _state(path, stat) not in _DIGESTS:
            _DIGESTS[_state(path, stat)] = Future()
            jobs.append((path, _DIGESTS[_state(path, stat)]))

    def run() -> None:
        for path, future in jobs:
            try:
                future.set_result(file_sha256(path))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever asks for this digest
                future.set_exception(exc)

    if jobs:
        threading.Thread(target=run, name="smile-digest", daemon=True).start()


def input_identity(path: Path) -> dict:
    """What identifies an input file's content for the journal: size and sha256 (the background
    job's, when one hashed the file as it is now), or for a large file size, mtime and inode."""
    stat = path.stat()
    if stat.st_size > HASHED_INPUT_BYTES:
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    job = _DIGESTS.pop(_state(path, stat), None)
    return {"size": stat.st_size, "sha256": job.result() if job is not None else file_sha256(path)}


_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_SMALL_FILES = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_folder(ref: str) -> Path:
    """A local folder as given, or the local snapshot of a hub repository (cache first).

    From the hub, only configs/tokenizer files and the weight files an index lists are fetched.
    `HF_HUB_OFFLINE=1` is honoured: then only the local cache is used.
    """
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SmileError(f"{ref} is a file; pass the folder that holds the model or adapter.")
        if not any(path.iterdir()):
            raise SmileError(f"{ref} is an empty folder; it should hold a model (config.json + *.safetensors) or a LoRA adapter.")
        return path.resolve()
    if ref.startswith((".", "/", "~")) or not _REPO_ID.fullmatch(ref):
        raise SmileError(f"{ref}: no such folder, and it is not a hub repository id (organisation/name).")
    return _hub_snapshot(ref)


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=_SMALL_FILES))
        if (folder / ADAPTER_CONFIG).is_file():
            names = [ADAPTER_WEIGHTS]
        elif (folder / INDEX_FILE).is_file():
            names = sorted(set(load_json(folder / INDEX_FILE, "weights index").get("weight_map", {}).values()))
        else:
            names = ["model.safetensors"]
        for name in names:
            try:
                hf_hub_download(repo_id, name)
            except EntryNotFoundError:
                pass  # Checkpoint() reports what is missing, with the folder it looked in
        return folder
    except LocalEntryNotFoundError:
        raise SmileError(
            f"{repo_id} is not in the local Hugging Face cache and the hub cannot be reached (offline mode or no "
            f"network). Download it first (`hf download {repo_id}`) or pass a local folder."
        ) from None
    except HfHubHTTPError as exc:
        raise SmileError(f"{repo_id}: the hub refused the download ({exc}). Check the id and your access token.") from None


def open_source(ref: str, allow_pickle: bool = False) -> Checkpoint | LoraAdapter:
    """A base model or expert: a LoRA adapter if the folder has adapter_config.json, else a full model."""
    folder = resolve_folder(ref)
    if (folder / ADAPTER_CONFIG).is_file():
        return LoraAdapter(folder, ref, allow_pickle)
    return Checkpoint(folder, ref, allow_pickle)


def cache_folder() -> Path | None:
    """smile-stream's own cache (discovered architectures, safetensors copies of pickles):
    $SMILE_STREAM_CACHE (set but empty: none), else $XDG_CACHE_HOME/smile-stream, else ~/.cache/smile-stream."""
    chosen = os.environ.get("SMILE_STREAM_CACHE")
    if chosen is not None:
        return Path(chosen) if chosen else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "smile-stream"


def unpickled(path: Path) -> Path:
    """A safetensors copy of a pickle checkpoint (only with --allow-pickle), cached by path, size and
    mtime. torch.load runs with weights_only=True and mmap=True; tensors are written one at a time."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_folder()
    if folder is None:
        raise SmileError(
            f"{path}: --allow-pickle converts pickle checkpoints into a cached safetensors copy, but SMILE_STREAM_CACHE "
            "is set empty (no cache). Point it at a folder."
        )
    cache = folder / "unpickled" / key
    target = cache / (path.stem + ".safetensors")
    if target.is_file():
        return target
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - whatever the unpickler refuses, say which file
        raise SmileError(
            f"{path}: torch.load(weights_only=True) refused it ({exc}). Convert it to safetensors yourself."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SmileError(f"{path} does not hold a flat dict of tensors (a state dict); smile-stream cannot read it.")
    odd = next((n for n, v in state.items() if v.dtype not in DTYPE_CODES), None)
    if odd is not None:
        raise SmileError(
            f"{path}: tensor {odd!r} has dtype {state[odd].dtype}, which safetensors models do not use here (floats, "
            "integers, bool and float8 are). Save the checkpoint without it."
        )
    cache.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    header = safetensors_header([(n, DTYPE_CODES[state[n].dtype], tuple(state[n].shape)) for n in names])
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        for name in names:
            f.write(memoryview(state[name].contiguous().view(-1).view(torch.uint8).numpy()))
    os.replace(partial, target)
    return target
