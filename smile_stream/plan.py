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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .architecture import Architecture, check_base_tensors, discover, layer_of, select_targets
from .errors import SmileError
from .experts import Expert, open_expert
from .modeling_smile import SMILE_FORMAT_VERSION, expert_shapes
from .options import Options, resolve_device
from .sources import Checkpoint, LoraAdapter, digest_in_background, input_path, open_source
from .tensors import DTYPE_CODES, FLOAT_CODES, TensorInfo, itemsize, safetensors_header

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
    averaged over the full experts) | expert (an expert tensor of `module`)."""

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
    """One output shard: written tensor by tensor after `header`, or, with `source`, a base file
    whose tensors all pass unchanged, placed whole (hard link, reflink or copy: `--base-files`)."""

    filename: str
    tensors: list[TensorPlan]
    header: bytes = b""
    source: Path | None = None  # a base file passing unchanged: its header and tensors, in its order

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

    # non-target tensor -> {expert: relative difference ||W_i - W0|| / ||W0||}, where it is not 0
    changed_non_targets: dict[str, dict[str, float]] = field(default_factory=dict)
    # base tensors left out of the output (not part of the model the config describes), with why
    dropped: dict[str, str] = field(default_factory=dict)
    # tensors that only experts have (name -> why they are not in the output)
    expert_only: dict[str, str] = field(default_factory=dict)
    # metadata files of the base copied into the output: output name -> input path
    copied_files: dict[str, Path] = field(default_factory=dict)
    # `--expert-rank energy:F`: module -> per expert slot (singular values, total energy)
    spectra: dict[str, list[tuple[list[float], float]]] = field(default_factory=dict)

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


def _check_experts(options: Options, experts: list[tuple[str, str]]) -> None:
    if not experts:
        raise SmileError("No experts given. Pass at least one --expert NAME=PATH (a LoRA adapter or a fine-tuned model).")
    names = [n for n, _ in experts]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SmileError(f"Expert names must be unique; {dupes} given more than once. Name each --expert differently.")
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SmileError(f"Expert name {name!r}: use letters, digits, '_', '-' and '.' only.")
    if options.top_k > len(experts):
        raise SmileError(
            f"--top-k {options.top_k} is larger than the number of experts ({len(experts)}). Use at most {len(experts)}."
        )


def layout(tensors: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    """Cut the ordered tensors into shards of at most `max_shard_size` tensor bytes, name them and
    build their headers. Cuts fall between decoder layers, so that each layer's expert tensors are
    in one shard and a shard's writer factors whole layers (with several processes, no layer is
    factored twice); a layer larger than a shard is cut between its tensors, and a tensor larger
    than a shard gets a shard of its own."""

    runs: list[list[TensorPlan]] = []  # consecutive tensors of one layer
    for tensor in tensors:
        if runs and runs[-1][0].layer == tensor.layer:
            runs[-1].append(tensor)
        else:
            runs.append([tensor])
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for run in runs:
        run_size = sum(t.nbytes for t in run)
        if groups[-1] and size + run_size > max_shard_size:
            groups.append([])
            size = 0
        for tensor in run:  # a run alone over the limit is cut between its tensors
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


def arrange(base: Checkpoint, tensors: list[TensorPlan], max_shard_size: int) -> list[ShardPlan]:
    """The output shards: first each base file whose tensors all pass into the output unchanged (same
    names, dtypes and bytes, none left out), as it is; then the other tensors (expert factors,
    casts, averages, the rest of changed files) cut into new shards by `layout`. A conversion then
    writes only what it adds, and the base files can be linked instead of copied."""
    whole = []
    for file in base.files:
        unchanged = [t for t in tensors if t.role == "copy" and t.source is not None and t.source.file == file.path]
        if len(unchanged) == len(file.tensors) and file.metadata.get("format") == "pt":
            whole.append((file, unchanged))
    placed = {id(t) for _, members in whole for t in members}
    new = layout([t for t in tensors if id(t) not in placed], max_shard_size) if len(placed) < len(tensors) else []
    total = len(whole) + len(new)
    shards = [
        ShardPlan("", sorted(members, key=lambda t: t.source.offset), _raw_header(file.path), Path(file.path).resolve())
        for file, members in whole
    ] + new
    for i, shard in enumerate(shards):
        shard.filename = SHARD_NAME.format(i + 1, total)
    return shards


def _raw_header(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def _header(tensors: list[TensorPlan]) -> bytes:
    return safetensors_header([(t.name, t.dtype, t.shape) for t in tensors])


def make_plan(base_ref: str, expert_refs: list[tuple[str, str]], options: Options, digest_inputs: bool = False) -> Plan:
    """Read headers and configs of every input, validate them, and plan the whole output.
    `digest_inputs`: also hash the inputs for the journal meanwhile (the run that writes it)."""
    options.validate()
    _check_experts(options, expert_refs)
    device = resolve_device(options.device)
    base = open_source(base_ref, options.allow_pickle)
    if isinstance(base, LoraAdapter):
        raise SmileError(
            f"--base {base_ref} is a LoRA adapter; the base must be a full model folder (config.json + *.safetensors)."
        )
    experts = [open_expert(name, ref, options.allow_pickle) for name, ref in expert_refs]
    if digest_inputs:
        digest_in_background([*base.read_paths, *(path for expert in experts for path in expert.source.read_paths)])
    architecture = discover(base, options.trust_remote_code)
    linears, model_tensors = architecture.linears, architecture.tensors
    dropped = check_base_tensors(base, model_tensors)
    targets = select_targets(base, linears, options.targets)

    touched: dict[str, dict[int, int]] = {}  # module -> {expert index: its delta's largest rank}
    bias_modules: set[str] = set()
    changed: dict[str, dict[str, float]] = {}
    expert_only: dict[str, str] = {}
    for index, expert in enumerate(experts):
        expert.check_architecture(base)
        ranks, biased = expert.touches(base, linears, targets)
        bias_modules |= biased
        for module, rank in ranks.items():
            touched.setdefault(module, {})[index] = rank
        differences, only = expert.changed_non_targets(base, targets, model_tensors.aliases)
        for tensor, difference in differences.items():
            changed.setdefault(tensor, {})[expert.name] = difference
        expert_only.update(only)

    modules = {}
    for name in sorted(touched, key=lambda n: (targets[n][2], base.tensors[n + ".weight"].offset, n)):
        fan_in, fan_out, layer = targets[name]
        weight = base.tensors[name + ".weight"]
        order = sorted(touched[name])
        if options.energy is None:
            ranks = [experts[i].rank(name, touched[name][i], options.fixed_rank) for i in order]
        else:  # the caps first; `_energy_ranks` lowers them
            cap = options.max_expert_rank
            ranks = [experts[i].rank(name, touched[name][i], cap and min(cap, touched[name][i])) for i in order]
        dtype = DTYPE_CODES[getattr(torch, options.dtype)] if options.dtype else weight.dtype
        modules[name] = ModulePlan(
            name, layer, fan_in, fan_out, weight, base.tensors.get(name + ".bias"), order, ranks, name in bias_modules, dtype
        )
    spectra = _energy_ranks(base, experts, options, device, modules, touched) if options.energy is not None else {}

    tensors = _output_tensors(base, modules, options, linears, changed, dropped)
    shards = arrange(base, tensors, options.max_shard_size)
    config = _output_config(base, architecture, experts, modules, options)
    if spectra:
        for name, module in modules.items():
            config["smile"]["modules"][name]["energy"] = [
                round(energy_kept(*spectra[name][slot], k), 6) for slot, k in enumerate(module.ranks)
            ]
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
        spectra,
    )


def energy_kept(values: list[float], total: float, rank: int) -> float:
    """The fraction of a delta's squared singular-value mass its first `rank` directions hold."""
    return sum(v * v for v in values[:rank]) / total if total > 0 else 1.0


def energy_rank(values: list[float], total: float, fraction: float, cap: int, floor: int) -> int:
    """The smallest rank holding `fraction` of the energy, within [min(floor, cap), cap]."""
    kept, rank = 0.0, len(values)
    for k, value in enumerate(values, 1):
        kept += value * value
        if total <= 0 or kept >= fraction * total * (1 - 1e-9):
            rank = k
            break
    return max(min(floor, cap), min(rank, cap))


def _energy_ranks(base, experts, options: Options, device: str, modules: dict[str, ModulePlan], touched: dict) -> dict:
    """`--expert-rank energy:F`: compute every delta's spectrum (LoRA exactly at its own r, dense
    deltas by the same truncated SVD as the conversion, at the cap) and set each module's ranks to
    the smallest that hold F of the energy, never above the cap, nor below the gate rank (the router
    scores each expert on its first g directions). Returns the spectra."""
    from .factorize import Factorizer

    caps = {name: list(module.ranks) for name, module in modules.items()}
    for name, module in modules.items():  # LoRA operands: the whole spectrum, so the total is exact
        module.ranks = [touched[name][i] if experts[i].engine == "qr" else r for i, r in zip(module.experts, module.ranks)]
    probe = Plan(base, experts, options, device, modules, [], {}, "", {})
    spectra = Factorizer(probe).spectra()
    for name, module in modules.items():
        module.ranks = [
            energy_rank(*spectra[name][slot], options.energy, cap, options.gate_rank) for slot, cap in enumerate(caps[name])
        ]
    return spectra


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
        layer = layer_of(info.name, blocks)
        out.append(TensorPlan(info.name, dtype, info.shape, layer, role, source=info))
        module = modules.get(info.name.removesuffix(".weight")) if info.name.endswith(".weight") else None
        if module is not None:
            for suffix, shape in expert_shapes(module.in_features, module.out_features, module.ranks, module.expert_bias).items():
                out.append(TensorPlan(f"{module.name}.{suffix}", module.dtype, shape, layer, "expert", module=module.name))
    return out


def _output_config(
    base: Checkpoint, architecture: Architecture, experts: list[Expert], modules: dict[str, ModulePlan], options: Options
) -> dict:
    config = dict(base.config)
    config["auto_map"] = {"AutoModelForCausalLM": f"modeling_smile.Smile{architecture.name}"}
    if architecture.backbone:  # serving engines' Transformers backends load the backbone through AutoModel
        config["auto_map"]["AutoModel"] = f"modeling_smile.Smile{architecture.backbone}"
    if options.dtype:
        config["dtype"] = config["torch_dtype"] = options.dtype
    config["smile"] = {
        "format_version": SMILE_FORMAT_VERSION,
        "base": base.source,
        "gate_rank": options.gate_rank,
        "top_k": options.top_k,
        "routing": options.routing,
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
    record = {
        "format_version": SMILE_FORMAT_VERSION,
        "options": options.record(device),
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
