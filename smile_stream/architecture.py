"""Architecture: the base model built with empty weights (no memory, no data), and what it tells
the plan: its linear layers and decoder blocks, which linears are targets, and which tensors a
checkpoint of it must hold (the same rules `verify` applies to a converted folder)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import fields
from .errors import SmileError
from .sources import Checkpoint
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


def discover_linears(base: Checkpoint, trust_remote_code: bool) -> tuple[str, dict[str, tuple[int, int, int]], ModelTensors]:
    """Build the base architecture with empty weights and list its linear layers and tensors.

    Returns the architecture class name, {module name: (in, out, decoder block index or -1)} and
    the tensors the model has.
    """
    import transformers
    from accelerate import init_empty_weights

    config_path = base.folder / "config.json"
    if fields.get(base.config, "auto_map", "dict|null", config_path, None) and not trust_remote_code:
        raise SmileError(
            f"{config_path} asks for remote code (auto_map). smile-stream does not run code from its inputs by default; "
            "pass --trust-remote-code if you trust this model's authors."
        )
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
    return arch, linears, ModelTensors.of(model)


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
