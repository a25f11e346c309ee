"""Architecture: the base model built with empty weights (no memory, no data), and what it tells
the plan: its linear layers and decoder blocks, which linears are targets, and which tensors a
checkpoint of it must hold (the same rules `verify` applies to a converted folder)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from . import fields
from .errors import SmileError
from .sources import Checkpoint, cache_folder
from .tensors import FLOAT_CODES


@dataclass
class ModelTensors:
    """The tensors a model built from a config has: parameters and persistent buffers with their
    shapes, and the names tied to another tensor (`lm_head.weight` -> `model.embed_tokens.weight`)."""

    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelTensors:
        model.tie_weights()  # transformers 5 does not tie inside init_empty_weights
        persistent = model.state_dict(keep_vars=True)
        canonical: dict[int, str] = {}
        shapes, aliases = {}, {}
        for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
            if name not in persistent:
                continue  # a non-persistent buffer (rotary inv_freq in recent transformers): never saved
            first = canonical.setdefault(id(tensor), name)
            if first == name:
                shapes[name] = tuple(tensor.shape)
            else:
                aliases[name] = first
        return cls(shapes, aliases)

    def problems(self, tensors: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
        """(missing or misshapen tensors, as messages; names of tensors the model does not have)."""
        problems = []
        for name, shape in self.shapes.items():
            if name not in tensors:
                problems.append(f"tensor {name} {list(shape)} is missing")
            elif tensors[name] != shape:
                problems.append(f"tensor {name} has shape {list(tensors[name])} but the config implies {list(shape)}")
        extra = sorted(n for n in tensors if n not in self.shapes and n not in self.aliases)
        return problems, extra


@dataclass
class Architecture:
    """What the plan learns from the base model built with empty weights."""

    name: str  # the transformers class in config.json's `architectures`, e.g. MistralForCausalLM
    backbone: str | None  # AutoModel's class for its model_type (serving engines load that)
    linears: dict[str, tuple[int | None, int | None, int]]  # module -> (in, out, decoder block or -1)
    tensors: ModelTensors

    def record(self) -> dict:
        linears = {name: list(value) for name, value in self.linears.items()}
        shapes = {name: list(shape) for name, shape in self.tensors.shapes.items()}
        return {
            "name": self.name,
            "backbone": self.backbone,
            "linears": linears,
            "shapes": shapes,
            "aliases": self.tensors.aliases,
        }

    @classmethod
    def from_record(cls, record: object) -> Architecture | None:
        """The architecture a cache entry holds, or None unless every field has its exact type."""
        try:
            name, backbone = record["name"], record["backbone"]
            linears, shapes, aliases = record["linears"], record["shapes"], record["aliases"]
            if not (isinstance(name, str) and (backbone is None or isinstance(backbone, str))):
                return None
            for value in linears.values():
                if not (isinstance(value, list) and len(value) == 3 and _is_int(value[2])):
                    return None
                if not all(size is None or _is_int(size) for size in value[:2]):
                    return None
            if not all(isinstance(shape, list) and all(map(_is_int, shape)) for shape in shapes.values()):
                return None
            if not all(isinstance(alias, str) for alias in aliases.values()):
                return None
            model = ModelTensors({k: tuple(v) for k, v in shapes.items()}, dict(aliases))
            return cls(name, backbone, {k: tuple(v) for k, v in linears.items()}, model)
        except (TypeError, KeyError, AttributeError):
            return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Bump when what `discover` records changes: older cache entries are then never read.
ARCHITECTURE_CACHE_VERSION = 1


def _cache_file(base: Checkpoint) -> Path | None:
    folder = cache_folder()
    if folder is None:
        return None
    versions = {package: _version(package) for package in ("transformers", "torch", "smile-stream")}
    key = json.dumps([ARCHITECTURE_CACHE_VERSION, versions, base.config], sort_keys=True)
    return folder / "architectures" / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def discover(base: Checkpoint, trust_remote_code: bool) -> Architecture:
    """The base's architecture: from the cache when this config was discovered before with the same
    transformers, torch and smile-stream, else built with empty weights (and then cached).

    Building needs transformers and the model's code, whose import alone takes seconds, longer
    than a LoRA conversion that links its base files. A model with remote code (auto_map) is never
    cached: its code may change under the same config."""
    config_path = base.folder / "config.json"
    remote = fields.get(base.config, "auto_map", "dict|null", config_path, None)
    if remote and not trust_remote_code:
        raise SmileError(
            f"{config_path} asks for remote code (auto_map). smile-stream does not run code from its inputs by default; "
            "pass --trust-remote-code if you trust this model's authors."
        )
    path = None if remote else _cache_file(base)
    if path is not None and path.is_file():
        try:
            cached = Architecture.from_record(json.loads(path.read_text()))
        except (OSError, ValueError):
            cached = None
        if cached is not None:
            return cached
    architecture = _build(base, trust_remote_code)
    if path is not None:
        try:  # a cache that cannot be written only costs the next run its speed
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_text(json.dumps(architecture.record()))
            os.replace(partial, path)
        except OSError:
            pass
    return architecture


def _build(base: Checkpoint, trust_remote_code: bool) -> Architecture:
    import transformers
    from accelerate import init_empty_weights
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    config_path = base.folder / "config.json"
    architectures = fields.get(base.config, "architectures", "list|null", config_path, None) or []
    arch = architectures[0] if architectures else None
    if not isinstance(arch, str) or not isinstance(getattr(transformers, arch, None), type):
        raise SmileError(
            f"{config_path}: architectures is {architectures!r}; smile-stream needs a transformers model class there "
            "(for example LlamaForCausalLM) to build the converted model."
        )
    try:
        config = transformers.AutoConfig.from_pretrained(base.folder, trust_remote_code=trust_remote_code)
        with init_empty_weights():
            model = getattr(transformers, arch)._from_config(config)
    except Exception as exc:  # noqa: BLE001 - any failure here means transformers cannot build this config
        raise SmileError(
            f"{config_path}: transformers {transformers.__version__} cannot build {arch} from this config ({exc})."
        ) from None
    block_types = set(getattr(model, "_no_split_modules", None) or [])
    blocks = {
        n: int(n.rsplit(".", 1)[1])
        for n, m in model.named_modules()
        if type(m).__name__ in block_types and n.rsplit(".", 1)[-1].isdigit()
    }
    linears = {}
    for name, module in model.named_modules():
        block = next((i for prefix, i in blocks.items() if name.startswith(prefix + ".")), -1)
        if isinstance(module, torch.nn.Linear):
            linears[name] = (module.in_features, module.out_features, block)
        elif type(module).__name__ == "Conv1D":
            linears[name] = (None, None, block)  # GPT-2-style transposed linear: refused as a target
    model_type = base.config.get("model_type")
    backbone = MODEL_MAPPING_NAMES.get(model_type) if isinstance(model_type, str) else None
    return Architecture(arch, backbone, linears, ModelTensors.of(model))


def check_base_tensors(base: Checkpoint, model: ModelTensors) -> dict[str, str]:
    """Refuse a base whose tensors disagree with its config (the output would fail `verify`);
    the tensors the model does not have (old buffers such as rotary inv_freq) are dropped: {name: why}."""
    problems, extra = model.problems({n: t.shape for n, t in base.tensors.items()})
    if problems:
        raise SmileError(
            f"{base.folder}: the weights do not match the model config.json describes: {'; '.join(problems[:3])}"
            f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}. Fix the config (vocab_size, sizes) "
            "or the checkpoint; a converted folder would not load."
        )
    return {name: "not a parameter or saved buffer of the model its config describes" for name in extra}


def layer_of(name: str, blocks: dict[str, int]) -> int:
    prefix = name.rsplit(".", 2)[0]
    while prefix:
        if prefix in blocks:
            return blocks[prefix]
        prefix = prefix.rpartition(".")[0]
    return -1


def select_targets(base: Checkpoint, linears: dict, pattern: str | None) -> dict[str, tuple[int, int, int]]:
    if pattern is not None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise SmileError(f"--targets {pattern!r} is not a valid regular expression ({exc}).") from None
        chosen = {n: v for n, v in linears.items() if regex.search(n)}
    else:
        chosen = {n: v for n, v in linears.items() if v[2] >= 0}
    conv = sorted(n for n, v in chosen.items() if v[0] is None)
    if conv:
        raise SmileError(
            f"{base.folder}: {conv[0]} is a GPT-2-style Conv1D layer (weights stored transposed, LoRA with "
            "fan_in_fan_out). smile-stream upscales nn.Linear layers only; this architecture is not supported yet."
        )

    if not chosen:
        raise SmileError(
            f"No linear layer of the base matches --targets {pattern!r}."
            if pattern
            else "The base model has no linear layers inside its decoder blocks."
        )
    for name, (fan_in, fan_out, _) in chosen.items():
        info = base.tensors.get(name + ".weight")
        if info is None:
            raise SmileError(
                f"{base.folder}: the model has a linear layer {name!r} but its checkpoint has no tensor {name + '.weight'!r}. Is this checkpoint saved with a different key layout (prefix)?"
            )
        if info.shape != (fan_out, fan_in):
            raise SmileError(
                f"{info.file}: tensor {info.name!r} has shape {list(info.shape)}, but the config implies {[fan_out, fan_in]}. The config and the weights disagree."
            )
        if info.dtype not in FLOAT_CODES:
            raise SmileError(
                f"{info.file}: target tensor {info.name!r} is {info.dtype}, not floating point (a quantized or damaged "
                "checkpoint?). smile-stream upscales float weights (F32, F16, BF16, F64) only: dequantize the base, or "
                "leave this module out with --targets."
            )
    return chosen
