"""Load: open a converted folder as a transformers model without remote code, and describe it."""

from __future__ import annotations

import math
import os
from pathlib import Path

from . import fields
from .errors import SmileError
from .modeling_smile import EXPERT_TENSORS, INDEX_FILE, ROUTING_MODES, check_complete, check_format, smile_model_class
from .output import SPECTRA
from .report import energy_plot, energy_table, summarize_modules
from .sources import input_path, load_json
from .tensors import read_safetensors_header


def _smile_config(path: str | os.PathLike):
    import transformers

    try:
        check_complete(path)
    except OSError as exc:
        raise SmileError(str(exc)) from None
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise SmileError(f"{path}/config.json cannot be read as a model config ({exc}).") from None
    if not isinstance(getattr(config, "smile", None), dict):
        raise SmileError(f"{path}/config.json has no 'smile' section; this folder was not made by smile-stream.")
    try:
        check_format(config.smile)
    except ValueError as exc:
        raise SmileError(f"{path}: {exc}") from None
    check_smile_section(config.smile, Path(path) / "config.json")
    return config


def check_smile_section(smile: dict, where: Path) -> None:
    """The fields of config.json's `smile` section, each of its own type (else a SmileError)."""
    for key, kinds in (("gate_rank", "int"), ("top_k", "int"), ("experts", "list"), ("modules", "dict"), ("base", "str")):
        fields.get(smile, key, kinds, f"{where}: smile")
    if fields.get(smile, "routing", "str", f"{where}: smile", "module") not in ROUTING_MODES:
        raise SmileError(f"{where}: smile.routing is {smile['routing']!r}; choose one of {', '.join(ROUTING_MODES)}.")
    for i, expert in enumerate(smile["experts"]):
        at = f"{where}: smile.experts[{i}]"
        fields.check(expert, "dict", at)
        for key in ("name", "kind", "source"):
            fields.get(expert, key, "str", at)
    for name, spec in smile["modules"].items():
        at = f"{where}: smile.modules[{name!r}]"
        fields.check(spec, "dict", at)
        for key in ("experts", "ranks"):
            fields.get(spec, key, "list", at)
        for value in spec["experts"]:
            fields.check(value, "str", f"{at}.experts")
        for value in spec["ranks"]:
            fields.check(value, "int", f"{at}.ranks")
        fields.get(spec, "expert_bias", "bool", at, False)


def model_class(path: str | os.PathLike) -> tuple[type, object]:
    """The SMILE model class for a converted folder and its config (for empty-weights loading)."""
    import transformers

    config = _smile_config(path)
    return smile_model_class(getattr(transformers, config.architectures[0])), config


def load_model(path: str | os.PathLike, routing: str | None = None, **kwargs):
    """Load a converted folder with the package's own SMILE layer (no remote code needed).

    `routing` overrides the folder's routing mode ("module", "token" or "sequence"). Keyword
    arguments go to `from_pretrained`, e.g. `device_map="auto"`, `dtype=torch.bfloat16`,
    `max_memory=...`.
    """
    cls, config = model_class(path)
    model = cls.from_pretrained(path, config=config, **kwargs)
    if routing is not None:
        model.set_smile_routing(routing)
    return model


def plot_spectra(path: str | os.PathLike, png: str | os.PathLike) -> None:
    """`inspect --png`: energy vs rank per module kind, from the folder's smile-spectra.json."""
    folder = Path(path)
    spectra = folder / SPECTRA
    if not spectra.is_file():
        raise SmileError(
            f"{folder} has no {SPECTRA}: only conversions with --expert-rank energy:F record the spectra "
            "(convert --dry-run --expert-rank energy:F prints their summary without writing anything)."
        )
    energy_plot(load_json(input_path(folder, SPECTRA, "the spectra"), "spectra"), png)


def inspect_output(path: str | os.PathLike) -> str:
    """What `smile-stream inspect` prints: experts, ranks, parameter overhead, experts per module."""
    folder = Path(path)
    config = _smile_config(folder).smile
    index = load_json(folder / INDEX_FILE, "weights index")
    fields.get(index, "weight_map", "dict", folder / INDEX_FILE)
    fields.get(index, "metadata", "dict", folder / INDEX_FILE)
    base = added = 0
    for shard in sorted(set(index["weight_map"].values())):
        for name, info in read_safetensors_header(input_path(folder, shard, "the shard")).tensors.items():
            n = math.prod(info.shape)
            if name.rsplit(".", 1)[-1] in EXPERT_TENSORS:
                added += n
            else:
                base += n
    lines = [
        f"{folder}: SMILE format {config['format_version']}, gate rank {config['gate_rank']}, top-{config['top_k']}, routing {config.get('routing', 'module')}"
    ]
    for expert in config["experts"]:
        lines.append(f"expert   {expert['name']:<12} {expert['kind']:<4}  {expert['source']}")
    lines += summarize_modules(config)
    energy = energy_table(config)
    if energy:
        lines.append("energy   ranks chosen by energy (smile-spectra.json; inspect --png plots energy vs rank):")
        lines += [f"         {row}" for row in energy]
    lines.append(f"params   {base:,} base + {added:,} expert ({added / max(base, 1):.2%} overhead)")
    lines.append(
        f"size     {index['metadata']['total_size']:,} tensor bytes in {len(set(index['weight_map'].values()))} shard(s)"
    )
    return "\n".join(lines)
