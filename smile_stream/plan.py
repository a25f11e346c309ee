"""Plan: decide everything about a conversion from configs and safetensors headers alone.

Which modules are targets, which experts touch each and at what rank, every output tensor's name,
dtype, shape and shard, the shard headers, the output config and a hash that identifies the run.
All input validation happens here, so that a run that would fail fails in its first seconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import fields
from .errors import SmileError
from .modeling_smile import SMILE_FORMAT_VERSION
from .sources import (
    DTYPE_CODES,
    FLOAT_CODES,
    Checkpoint,
    LoraAdapter,
    TensorInfo,
    input_path,
    itemsize,
    open_source,
    safetensors_header,
)

DEFAULT_FULL_EXPERT_RANK = 128
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
# files of the base copied into the output beside the weights, if present
COPIED_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass
class Options:
    """Conversion options; every field is part of the plan hash except `device` (only its kind is)."""

    gate_rank: int = 8
    top_k: int = 1
    expert_rank: int | None = None  # None: each LoRA's own r; DEFAULT_FULL_EXPERT_RANK for full experts
    dtype: str | None = None  # None: the base's dtype, tensor by tensor
    max_shard_size: int = 5 * 10**9
    targets: str | None = None  # regex over module names; None: every linear inside the decoder blocks
    svd: str = "auto"  # auto | exact | randomized
    non_linear: str = "base"  # base | average: where non-target parameters of full experts come from
    device: str = "auto"
    trust_remote_code: bool = False
    allow_pickle: bool = False  # read .bin/.pt inputs (torch.load with weights_only=True)


@dataclass
class Expert:
    name: str
    source: Checkpoint | LoraAdapter

    @property
    def kind(self) -> str:
        return "lora" if isinstance(self.source, LoraAdapter) else "full"


@dataclass
class ModulePlan:
    """One upscaled linear: its base tensors and the experts it holds, in routing order."""

    name: str
    layer: int
    in_features: int
    out_features: int
    weight: TensorInfo
    bias: TensorInfo | None
    experts: list[int]  # indices into Plan.experts
    ranks: list[int]
    expert_bias: bool
    dtype: str  # dtype code of the expert tensors


@dataclass
class TensorPlan:
    """One output tensor. `role`: copy | cast (a base tensor) | average (non-linear parameter
    averaged over the base and full experts) | down | up | bias (expert tensors of `module`)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    layer: int
    role: str
    source: TensorInfo | None = None
    module: str | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class ShardPlan:
    filename: str
    tensors: list[TensorPlan]
    header: bytes = b""

    @property
    def size(self) -> int:
        return 8 + len(self.header) + sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    base: Checkpoint
    experts: list[Expert]
    options: Options
    device: str
    modules: dict[str, ModulePlan]
    shards: list[ShardPlan]
    config: dict
    hash: str
    record: dict

    # non-target tensor -> {full expert: relative difference ||W_i - W0|| / ||W0||}, where it is not 0
    changed_non_targets: dict[str, dict[str, float]] = field(default_factory=dict)
    # base tensors left out of the output (not part of the model the config describes), with why
    dropped: dict[str, str] = field(default_factory=dict)
    # tensors that only full experts have (name -> why they are not in the output)
    expert_only: dict[str, str] = field(default_factory=dict)
    # metadata files of the base copied into the output: output name -> input path
    copied_files: dict[str, Path] = field(default_factory=dict)

    @property
    def total_size(self) -> int:
        """Tensor bytes, as `metadata.total_size` of the index counts them."""
        return sum(t.nbytes for s in self.shards for t in s.tensors)

    @property
    def output_bytes(self) -> int:
        return sum(s.size for s in self.shards)

    @property
    def base_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.base.tensors.values())

    @property
    def added_params(self) -> int:
        return sum(math.prod(t.shape) for s in self.shards for t in s.tensors if t.module)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000, '500MiB' -> 524_288_000, 1000 -> 1000."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not match:
        raise SmileError(f"--max-shard-size {text!r} is not a size; write it like 5GB, 500MB or 2GiB.")
    number, unit, binary = match.groups()
    base = 1024 if binary else 1000
    return int(float(number) * base ** "_KMGT".index(unit.upper() or "_"))


def resolve_device(name: str) -> str:
    try:
        kind = torch.device(name).type if name != "auto" else "auto"
    except (RuntimeError, ValueError):
        raise SmileError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N.") from None
    if kind not in ("auto", "cpu", "cuda"):
        raise SmileError(f"--device {name!r}: smile-stream computes on cpu or cuda; use auto, cpu, cuda or cuda:N.")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SmileError(f"--device {name} was asked for, but PyTorch sees no CUDA device here. Use --device cpu or auto.")
    return name


def _check_options(options: Options, experts: list[tuple[str, str]]) -> None:
    if not experts:
        raise SmileError("No experts given. Pass at least one --expert NAME=PATH (a LoRA adapter or a fine-tuned model).")
    names = [n for n, _ in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SmileError(f"Expert names must be unique; {dupes} given more than once. Name each --expert differently.")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SmileError(f"Expert name {name!r}: use letters, digits, '_', '-' and '.' only.")
    if options.gate_rank < 1 or options.top_k < 1:
        raise SmileError("--gate-rank and --top-k must be at least 1.")
    if options.top_k > len(experts):
        raise SmileError(
            f"--top-k {options.top_k} is larger than the number of experts ({len(experts)}). Use at most {len(experts)}."
        )
    if options.expert_rank is not None and options.expert_rank < options.gate_rank:
        raise SmileError(
            f"--gate-rank {options.gate_rank} is larger than --expert-rank {options.expert_rank}: the router reads the "
            "first gate-rank directions of each expert. Lower --gate-rank or raise --expert-rank."
        )
    if options.dtype is not None and options.dtype not in ("float32", "float16", "bfloat16"):
        raise SmileError(f"--dtype {options.dtype!r}: choose float32, float16 or bfloat16.")
    if options.svd not in ("auto", "exact", "randomized"):
        raise SmileError(f"--svd {options.svd!r}: choose auto, exact or randomized.")
    if options.non_linear not in ("base", "average"):
        raise SmileError(f"--non-linear {options.non_linear!r}: choose base or average.")
    if options.max_shard_size < 1:
        raise SmileError("--max-shard-size must be positive.")


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


def _check_base_tensors(base: Checkpoint, model: ModelTensors) -> dict[str, str]:
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


def _layer_of(name: str, blocks: dict[str, int]) -> int:
    prefix = name.rsplit(".", 2)[0]
    while prefix:
        if prefix in blocks:
            return blocks[prefix]
        prefix = prefix.rpartition(".")[0]
    return -1


def _select_targets(base: Checkpoint, linears: dict, pattern: str | None) -> dict[str, tuple[int, int, int]]:
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


def _lora_touches(adapter: LoraAdapter, name: str, linears: dict, targets: dict) -> dict[str, int]:
    touched = {}
    for module, lora in adapter.modules.items():
        where = adapter.folder / "adapter_model.safetensors"
        if module not in linears:
            raise SmileError(
                f"{where}: expert {name!r} adapts {module!r}, which is not a module of the base model. Is this adapter for a different base?"
            )
        if module not in targets:
            raise SmileError(
                f"{where}: expert {name!r} adapts {module!r}, which is not a target. Widen --targets to include it, or use an adapter without it."
            )
        fan_in, fan_out, _ = targets[module]
        if lora.a.shape[1] != fan_in or lora.b.shape[0] != fan_out:
            raise SmileError(
                f"{where}: expert {name!r}, module {module!r}: lora_A/lora_B map {lora.a.shape[1]} -> {lora.b.shape[0]} "
                f"features, but the base layer maps {fan_in} -> {fan_out}. The adapter was trained on a different base."
            )
        touched[module] = min(lora.rank, fan_in, fan_out)  # a delta of an (out, in) layer has rank <= min(in, out)
    return touched


def _full_touches(base: Checkpoint, expert: Checkpoint, name: str, targets: dict) -> tuple[dict[str, int], set[str]]:
    """Modules whose weight differs from the base, and which of them also change the bias."""
    for tensor, info in base.tensors.items():
        other = expert.tensors.get(tensor)
        if other is None:
            raise SmileError(
                f"{expert.folder}: expert {name!r} has no tensor {tensor!r}, which the base has. Is it a fine-tune of this base?"
            )
        if other.shape != info.shape and not _added_tokens(info, other, targets):
            raise SmileError(
                f"{other.file}: expert {name!r}, tensor {tensor!r} has shape {list(other.shape)} but the base's is {list(info.shape)}. Is it a fine-tune of this base (same architecture and vocabulary)?"
            )
        if other.dtype != info.dtype:
            raise SmileError(
                f"{other.file}: expert {name!r}, tensor {tensor!r} is {other.dtype} but the base's is {info.dtype}. Save both in the same dtype."
            )
    touched, bias_changed = {}, set()
    for module, (fan_in, fan_out, _) in targets.items():
        if _bytes_differ(base.tensors[module + ".weight"], expert.tensors[module + ".weight"]):
            touched[module] = min(fan_in, fan_out)
        bias = module + ".bias"
        if bias in base.tensors and _bytes_differ(base.tensors[bias], expert.tensors[bias]):
            touched.setdefault(module, min(fan_in, fan_out))
            bias_changed.add(module)
    return touched, bias_changed


def _added_tokens(base: TensorInfo, other: TensorInfo, targets: dict) -> bool:
    """A non-target table (embeddings, lm_head) with extra rows: an expert that added tokens.
    Its first rows line up with the base's; the added rows are not used (the base tokenizer is kept)."""
    module = base.name.rsplit(".", 1)[0]
    return module not in targets and other.shape[1:] == base.shape[1:] and other.shape[0] > base.shape[0]


def _lora_nonzero(adapter: LoraAdapter, module: str) -> bool:
    lora = adapter.modules[module]
    return bool(adapter.read(lora.a).any()) and bool(adapter.read(lora.b).any())


def _bytes_differ(a: TensorInfo, b: TensorInfo, chunk: int = 1 << 24) -> bool:
    # Fine-tunes almost always differ in the first bytes, so this rarely reads more than a page.
    with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
        done, step = 0, 1 << 16
        while done < a.nbytes:
            n = min(step, a.nbytes - done)
            fa.seek(a.offset + done)
            fb.seek(b.offset + done)
            if fa.read(n) != fb.read(n):
                return True
            done, step = done + n, chunk
    return False


def layout(tensors: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    """Cut the ordered tensors into shards of at most `max_shard_size` tensor bytes (a larger tensor
    gets a shard of its own), name them and build their headers."""

    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        if groups[-1] and size + tensor.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += tensor.nbytes
    shards = []
    for i, group in enumerate(groups):
        # Larger items first keeps every tensor aligned to its element size inside the file.
        group.sort(key=lambda t: -itemsize(t.dtype))
        shard = ShardPlan(SHARD_NAME.format(i + 1, len(groups)), group)
        shard.header = _header(group)
        shards.append(shard)
    return shards


def _header(tensors: list[TensorPlan]) -> bytes:
    return safetensors_header([(t.name, t.dtype, t.shape) for t in tensors])


def make_plan(base_ref: str, expert_refs: list[tuple[str, str]], options: Options) -> Plan:
    """Read headers and configs of every input, validate them, and plan the whole output."""
    _check_options(options, expert_refs)
    device = resolve_device(options.device)
    base = open_source(base_ref, options.allow_pickle)
    if isinstance(base, LoraAdapter):
        raise SmileError(
            f"--base {base_ref} is a LoRA adapter; the base must be a full model folder (config.json + *.safetensors)."
        )
    experts = [Expert(name, open_source(ref, options.allow_pickle)) for name, ref in expert_refs]
    arch, linears, model_tensors = discover_linears(base, options.trust_remote_code)
    dropped = _check_base_tensors(base, model_tensors)
    targets = _select_targets(base, linears, options.targets)

    touched: dict[str, dict[int, int]] = {}  # module -> {expert index: max rank}
    bias_modules: set[str] = set()
    for index, expert in enumerate(experts):
        if expert.kind == "lora":
            ranks = _lora_touches(expert.source, expert.name, linears, targets)
            ranks = {m: r for m, r in ranks.items() if _lora_nonzero(expert.source, m)}
            if not ranks:
                raise SmileError(
                    f"{expert.source.folder}: expert {expert.name!r} is equal to the base: every lora_A or lora_B is zero "
                    "(an untrained adapter?). Remove it."
                )
        else:
            _check_same_architecture(base, expert)
            ranks, biased = _full_touches(base, expert.source, expert.name, targets)
            bias_modules |= biased
            if not ranks:
                raise SmileError(
                    f"{expert.source.folder}: expert {expert.name!r} has the same weights as the base in every target module. Remove it."
                )
        for module, rank in ranks.items():
            touched.setdefault(module, {})[index] = rank

    modules = {}
    for name in sorted(touched, key=lambda n: (targets[n][2], base.tensors[n + ".weight"].offset, n)):
        fan_in, fan_out, layer = targets[name]
        weight = base.tensors[name + ".weight"]
        order = sorted(touched[name])
        ranks = [_expert_rank(experts[i], name, touched[name][i], options) for i in order]
        dtype = DTYPE_CODES[getattr(torch, options.dtype)] if options.dtype else weight.dtype
        modules[name] = ModulePlan(
            name, layer, fan_in, fan_out, weight, base.tensors.get(name + ".bias"), order, ranks, name in bias_modules, dtype
        )

    changed, expert_only = _changed_non_targets(base, experts, targets, model_tensors)
    tensors = _output_tensors(base, modules, options, linears, changed, dropped)
    shards = layout(tensors, options.max_shard_size)
    config = _output_config(base, arch, experts, modules, options)
    record = _plan_record(base, experts, options, device)
    copied = {name: path for name in COPIED_FILES if (path := input_path(base.folder, name)).is_file()}
    return Plan(
        base,
        experts,
        options,
        device,
        modules,
        shards,
        config,
        record_hash(record),
        record,
        changed,
        dropped,
        expert_only,
        copied,
    )


def _check_same_architecture(base: Checkpoint, expert: Expert) -> None:
    for key in (
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
    ):
        if key in base.config and expert.source.config.get(key) != base.config[key]:
            raise SmileError(
                f"{expert.source.folder / 'config.json'}: expert {expert.name!r} has {key} = {expert.source.config.get(key)!r} "
                f"but the base has {base.config[key]!r}. Experts must be fine-tunes of the base (same architecture and sizes)."
            )
    vocab, base_vocab = expert.source.config.get("vocab_size"), base.config.get("vocab_size")
    if isinstance(vocab, int) and isinstance(base_vocab, int) and vocab < base_vocab:
        raise SmileError(
            f"{expert.source.folder / 'config.json'}: expert {expert.name!r} has vocab_size = {vocab} but the base has "
            f"{base_vocab}. An expert may add tokens to the base's vocabulary, not remove them."
        )


def _expert_rank(expert: Expert, module: str, natural: int, options: Options) -> int:
    if expert.kind == "lora":  # a LoRA delta has rank r at most: a larger --expert-rank keeps it whole
        return min(natural, options.expert_rank or natural)
    if options.expert_rank and options.expert_rank > natural:
        raise SmileError(
            f"--expert-rank {options.expert_rank} is larger than module {module} allows for full expert {expert.name!r}: "
            f"its delta is {natural} wide at most (min of out and in features). Use --expert-rank {natural} or less."
        )
    return min(natural, options.expert_rank or DEFAULT_FULL_EXPERT_RANK)


def _changed_non_targets(
    base: Checkpoint, experts: list[Expert], targets: dict, model: ModelTensors
) -> tuple[dict[str, dict[str, float]], dict[str, str]]:
    """Non-target tensors that full experts changed ({tensor: {expert: relative difference}}), and
    tensors only experts have, which the output cannot hold ({tensor: why})."""
    target_tensors = {m + s for m in targets for s in (".weight", ".bias")}
    changed: dict[str, dict[str, float]] = {}
    expert_only: dict[str, str] = {}
    for expert in experts:
        if expert.kind != "full":
            continue
        source = expert.source
        for name, info in base.tensors.items():
            if name not in target_tensors and _bytes_differ(info, source.tensors[name]):
                changed.setdefault(name, {})[expert.name] = _relative_difference(base.read(name), source.read(name))
        for name in sorted(set(source.tensors) - set(base.tensors)):
            tied_to = model.aliases.get(name)
            if tied_to in base.tensors:  # e.g. lm_head of an expert fine-tuned with untied embeddings
                difference = _relative_difference(base.read(tied_to), source.read(name))
                if difference:
                    changed.setdefault(name, {})[expert.name] = difference
                expert_only[name] = (
                    f"the base ties it to {tied_to}, so the output keeps that tie and cannot hold an expert's own {name} "
                    "(with --non-linear average too)"
                )
            else:
                expert_only.setdefault(name, "the base has no such tensor")
                changed.setdefault(name, {})[expert.name] = float("inf")
    return changed, expert_only


def _relative_difference(w0: torch.Tensor, w1: torch.Tensor, rows: int = 4096) -> float:
    # Row blocks keep float32 copies of a large embedding table small.
    w1 = w1[: w0.shape[0]] if w0.dim() else w1  # an expert with added tokens: compare the base's rows
    if w0.dim() == 0:
        w0, w1 = w0.view(1), w1.view(1)
    diff = norm = 0.0
    for start in range(0, w0.shape[0], rows):
        a, b = w0[start : start + rows].double(), w1[start : start + rows].double()
        diff += float((b - a).pow(2).sum())
        norm += float(a.pow(2).sum())
    return (diff / norm) ** 0.5 if norm else float("inf")


def _output_tensors(
    base: Checkpoint, modules: dict[str, ModulePlan], options: Options, linears: dict, changed: dict, dropped: dict
) -> list[TensorPlan]:
    blocks = {}
    for name, (_, _, layer) in linears.items():
        if layer >= 0:
            blocks[name.rsplit(".", 2)[0]] = layer
    # The base's own file order: inputs are read front to back, and each layer's modules are
    # contiguous in every common layout, so the factorizer holds about one layer at a time.
    ordered = sorted((t for t in base.tensors.values() if t.name not in dropped), key=lambda t: (t.file, t.offset))

    out = []
    for info in ordered:
        dtype = info.dtype
        if options.dtype and info.dtype in FLOAT_CODES:
            dtype = DTYPE_CODES[getattr(torch, options.dtype)]
        role = (
            "average" if options.non_linear == "average" and info.name in changed else ("copy" if dtype == info.dtype else "cast")
        )
        layer = _layer_of(info.name, blocks)
        out.append(TensorPlan(info.name, dtype, info.shape, layer, role, source=info))
        module = modules.get(info.name.removesuffix(".weight")) if info.name.endswith(".weight") else None
        if module is not None:
            k = sum(module.ranks)
            out.append(
                TensorPlan(module.name + ".expert_down", module.dtype, (k, module.in_features), layer, "down", module=module.name)
            )
            out.append(
                TensorPlan(module.name + ".expert_up", module.dtype, (k, module.out_features), layer, "up", module=module.name)
            )
            if module.expert_bias:
                out.append(
                    TensorPlan(
                        module.name + ".expert_bias",
                        module.dtype,
                        (len(module.ranks), module.out_features),
                        layer,
                        "bias",
                        module=module.name,
                    )
                )
    return out


def _output_config(base: Checkpoint, arch: str, experts: list[Expert], modules: dict[str, ModulePlan], options: Options) -> dict:
    config = dict(base.config)
    config["auto_map"] = {"AutoModelForCausalLM": f"modeling_smile.Smile{arch}"}
    if options.dtype:
        config["dtype"] = config["torch_dtype"] = options.dtype
    config["smile"] = {
        "format_version": SMILE_FORMAT_VERSION,
        "base": base.source,
        "gate_rank": options.gate_rank,
        "top_k": options.top_k,
        "experts": [{"name": e.name, "kind": e.kind, "source": e.source.source} for e in experts],
        "modules": {
            m.name: {"experts": [experts[i].name for i in m.experts], "ranks": m.ranks, "expert_bias": m.expert_bias}
            for m in modules.values()
        },
    }
    return config


def _plan_record(base: Checkpoint, experts: list[Expert], options: Options, device: str) -> dict:
    """What identifies a run: format version, options, device kind, and every input's file names,
    sizes and header digests. Its hash is the plan hash; the journal keeps it to explain changes."""
    settings = asdict(options)
    settings["device"] = torch.device(device).type
    record = {
        "format_version": SMILE_FORMAT_VERSION,
        "options": settings,
        "base": [base.source, base.fingerprint],
        "experts": [[e.name, e.kind, e.source.source, e.source.fingerprint] for e in experts],
    }
    return json.loads(json.dumps(record, sort_keys=True, default=str))


def record_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def explain_changes(old: dict, new: dict) -> list[str]:
    """Human descriptions of what differs between two plan records (`old` may come from any journal)."""

    def part(record: dict, key: str, kind: type):
        value = record.get(key) if isinstance(record, dict) else None
        return value if isinstance(value, kind) else kind()

    def source(entry: object, at: int) -> object:
        return entry[at] if isinstance(entry, list) and len(entry) > at else None

    if not isinstance(old, dict):
        return ["the earlier run did not record its inputs"]
    changes = []
    if old.get("format_version") != new["format_version"]:
        changes.append(f"output format version {old.get('format_version')} -> {new['format_version']}")
    old_options = part(old, "options", dict)
    for key, value in new["options"].items():
        if old_options.get(key) != value:
            changes.append(f"option {key}: {old_options.get(key)!r} -> {value!r}")
    if old.get("base") != new["base"]:
        before = source(old.get("base"), 0)
        changes.append(
            f"base {new['base'][0]}: its files changed" if before == new["base"][0] else f"base {before} -> {new['base'][0]}"
        )
    old_experts = {source(e, 0): e for e in part(old, "experts", list)}
    new_names = [e[0] for e in new["experts"]]
    if list(old_experts) != new_names:
        changes.append(f"experts {list(old_experts)} -> {new_names}")
    for expert in new["experts"]:
        before = old_experts.get(expert[0])
        if before is not None and before != expert:
            changes.append(
                f"expert {expert[0]} ({expert[2]}): its files changed"
                if source(before, 2) == expert[2]
                else f"expert {expert[0]}: {source(before, 2)} -> {expert[2]}"
            )
    return changes or ["the plan differs"]


def plan_command(plan: Plan, out: str) -> str:
    """The `smile-stream convert` command line equivalent to this plan (for the model card)."""
    import shlex

    defaults = Options()
    words = ["smile-stream", "convert", "--base", plan.base.source]
    for e in plan.experts:
        words += ["--expert", f"{e.name}={e.source.source}"]
    words += ["--out", out]
    for key, value in asdict(plan.options).items():
        if value != getattr(defaults, key) and key != "device":
            flag = "--" + key.replace("_", "-")
            words += [flag] if value is True else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


def summarize_modules(smile: dict) -> list[str]:
    """Upscaled modules grouped by their name with layer numbers elided, and the experts each holds."""
    groups: dict[str, set] = {}
    for name, spec in smile["modules"].items():
        key = re.sub(r"\.\d+\.", ".N.", name)
        groups.setdefault(key, set()).add(" ".join(f"{e}:r{r}" for e, r in zip(spec["experts"], spec["ranks"])))
    layers = {m for name in smile["modules"] for m in re.findall(r"\.(\d+)\.", name)[:1]}
    lines = [f"targets  {len(smile['modules'])} upscaled modules in {len(layers)} layers"]
    for key, variants in sorted(groups.items()):
        lines += [f"         {key:<40} {variant}" for variant in sorted(variants)]
    return lines


def non_target_notes(plan: Plan) -> list[str]:
    """One line per non-target tensor that some full expert changed, with the relative difference,
    per tensor only experts have, and per base tensor left out of the output."""
    how = (
        "averaged over the full experts"
        if plan.options.non_linear == "average"
        else "taken from the base (--non-linear average to average)"
    )
    lines = []
    for tensor, diffs in sorted(plan.changed_non_targets.items()):
        where = ", ".join(f"{e} ({d:.2%})" if math.isfinite(d) else e for e, d in diffs.items())
        fate = f"dropped: {plan.expert_only[tensor]}" if tensor in plan.expert_only else how
        verb = "differs in" if any(map(math.isfinite, diffs.values())) else "is only in"
        lines.append(f"note     {tensor} {verb} {where}: {fate}")
    for tensor, why in sorted(plan.dropped.items()):
        lines.append(f"note     base tensor {tensor} is left out of the output: {why}")
    base_vocab = plan.base.config.get("vocab_size")
    for e in plan.experts:
        vocab = e.source.config.get("vocab_size") if e.kind == "full" else None
        if isinstance(vocab, int) and isinstance(base_vocab, int) and vocab > base_vocab:
            lines.append(
                f"note     expert {e.name} has {vocab - base_vocab} added tokens (vocab {vocab}, base {base_vocab}): their "
                "embedding and output rows are dropped and the base tokenizer is kept"
            )
    return lines


def describe(plan: Plan) -> str:
    """A human summary of the plan: what `--dry-run` prints."""
    lines = [f"base     {plan.base.source}  ({plan.base_params / 1e6:,.1f} M parameters)"]
    for e in plan.experts:
        held = sum(1 for m in plan.modules.values() if plan.experts.index(e) in m.experts)
        lines.append(f"expert   {e.name:<12} {e.kind:<4}  {e.source.source}  in {held} modules")
    opts = plan.options
    lines.append(f"routing  gate rank {opts.gate_rank}, top-{opts.top_k}; device {plan.device}; svd {opts.svd}")
    lines += summarize_modules(plan.config["smile"])
    lines += non_target_notes(plan)
    overhead = plan.added_params / max(plan.base_params, 1)
    lines.append(
        f"output   {plan.output_bytes / 1e6:,.1f} MB in {len(plan.shards)} shard(s); "
        f"+{plan.added_params / 1e6:,.2f} M parameters ({overhead:.2%} over the base)"
    )
    return "\n".join(lines)
