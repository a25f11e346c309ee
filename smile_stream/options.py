"""Conversion options, each defined once: type, default, help and choices live on the field, and
the command-line flags, the recipe keys and their checks, and the command echoed in the model card
are all generated from them (the way mergekit defines its merge options).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass, field

import torch

from . import fields
from .errors import SmileError
from .modeling_smile import ROUTING_MODES


def option(default, help: str, choices: tuple[str, ...] | None = None, kind: str | None = None, flag: bool = False):
    """A field of `Options`: `kind` overrides the type taken from the annotation ("size": an integer
    or a string such as 5GB), `flag` makes a boolean an on/off command-line switch."""
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind, "flag": flag})


@dataclass
class Options:
    """Conversion options; every field is part of the plan hash except `base_files` and `device`
    (only its kind is)."""

    gate_rank: int = option(8, "Router rank g: each expert's first g directions score it.")
    top_k: int = option(1, "Experts per token.")
    routing: str = option(
        "sequence",
        "How tokens pick experts: per module (the paper's), pooled over a token's modules, or also over the "
        "sequence (default: the best in the quality study).",
        ROUTING_MODES,
    )
    expert_rank: int | str | None = option(
        None,
        "Rank of the experts' factors: N, or energy:F for the smallest rank per module and expert that holds the "
        "fraction F of the delta's squared singular values, e.g. energy:0.9 (default: each LoRA's own r; 128 for "
        "full fine-tunes).",
        kind="rank",
    )
    max_expert_rank: int | None = option(None, "Cap on energy:F ranks (default: each LoRA's own r; 128 for full fine-tunes).")
    dtype: str | None = option(None, "Output dtype (default: the base's).", ("float32", "float16", "bfloat16"))
    max_shard_size: int = option(5 * 10**9, "Largest shard, e.g. 5GB (default), 500MB, 2GiB.", kind="size")
    targets: str | None = option(None, "Regex over module names to upscale (default: every linear in the decoder blocks).")
    svd: str = option("auto", "SVD for full fine-tunes.", ("auto", "exact", "randomized"))
    non_linear: str = option(
        "base", "Non-target parameters of full experts: from the base (default) or averaged.", ("base", "average")
    )
    base_files: str = option(
        "auto",
        "Base files that pass unchanged into the output: hard-link them (or reflink), else copy (auto, the default); "
        "link (refuse to copy); copy (an independent folder).",
        ("auto", "link", "copy"),
    )
    device: str = option("auto", "auto (default: CUDA when present), cpu, cuda, cuda:1 ...")
    trust_remote_code: bool = option(False, "Allow a base whose config asks for remote code.", flag=True)
    allow_pickle: bool = option(False, "Read .bin/.pt inputs with torch.load(weights_only=True).", flag=True)

    @classmethod
    def specs(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls))

    @classmethod
    def from_values(cls, values: dict, where: str) -> Options:
        """Options from recipe/flag values, each checked against its own type ("where" names the source)."""
        known = {f.name: f for f in cls.specs()}
        checked = {}
        for key, value in values.items():
            spec = known[key]
            fields.check(value, kind_of(spec), f"{where}: {key}")
            checked[key] = parse_size(value) if spec.metadata["kind"] == "size" else value
        return cls(**checked)

    @classmethod
    def from_argv(cls, words: list[str]) -> Options:
        """Options from command-line flags (`["--expert-rank", "128", "--allow-pickle"]`): the inverse of `argv`."""
        by_flag = {flag_name(spec): spec for spec in cls.specs()}
        values, words = {}, list(words)
        while words:
            spec = by_flag.get(words.pop(0))
            if spec is None:
                raise SmileError(f"unknown option in {words!r}; the options are {sorted(by_flag)}.")
            if spec.metadata["flag"]:
                values[spec.name] = True
            else:
                word = words.pop(0)
                if spec.metadata["kind"] == "rank":
                    values[spec.name] = parse_rank(word)
                else:
                    values[spec.name] = int(word) if kind_of(spec) == "int" else word
        return cls.from_values(values, "flags")

    def validate(self) -> None:
        """The checks that need no inputs: ranges and choices."""
        if self.gate_rank < 1 or self.top_k < 1:
            raise SmileError("--gate-rank and --top-k must be at least 1.")
        if isinstance(self.expert_rank, str):
            parse_energy(self.expert_rank)
        elif self.max_expert_rank is not None:
            raise SmileError("--max-expert-rank caps --expert-rank energy:F ranks; for one fixed rank use --expert-rank N.")
        if self.max_expert_rank is not None and self.max_expert_rank < 1:
            raise SmileError("--max-expert-rank must be at least 1.")
        if isinstance(self.expert_rank, int) and self.expert_rank < self.gate_rank:
            raise SmileError(
                f"--gate-rank {self.gate_rank} is larger than --expert-rank {self.expert_rank}: the router reads the "
                "first gate-rank directions of each expert. Lower --gate-rank or raise --expert-rank."
            )
        for spec in self.specs():
            value, choices = getattr(self, spec.name), spec.metadata["choices"]
            if choices and value is not None and value not in choices:
                raise SmileError(f"{flag_name(spec)} {value!r}: choose {', '.join(choices)}.")
        if self.max_shard_size < 1:
            raise SmileError("--max-shard-size must be positive.")

    @property
    def energy(self) -> float | None:
        """The fraction F of `--expert-rank energy:F`, or None for fixed ranks."""
        return parse_energy(self.expert_rank) if isinstance(self.expert_rank, str) else None

    @property
    def fixed_rank(self) -> int | None:
        """`--expert-rank N`, or None (the kinds' defaults, or energy ranks)."""
        return self.expert_rank if isinstance(self.expert_rank, int) else None

    def argv(self) -> list[str]:
        """The flags that reproduce these options (those that differ from the defaults, but device)."""
        words = []
        for spec in self.specs():
            value = getattr(self, spec.name)
            if value != spec.default and spec.name not in ("device", "base_files"):
                words += [flag_name(spec)] if value is True else [flag_name(spec), str(value)]
        return words

    def record(self, device: str) -> dict:
        """The settings the plan hash covers: not how base files are placed (the bytes are the same)."""
        settings = dataclasses.asdict(self)
        settings["device"] = torch.device(device).type
        del settings["base_files"]
        return settings


def kind_of(spec: dataclasses.Field) -> str:
    """The type a recipe value must have: "int", "str", "bool", "int|str" (sizes)."""
    if spec.metadata["kind"] in ("size", "rank"):
        return "int|str"
    return "|".join(part.strip() for part in str(spec.type).split("|") if part.strip() != "None")


def flag_name(spec: dataclasses.Field) -> str:
    return "--" + spec.name.replace("_", "-")


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


def parse_energy(text: str) -> float:
    """'energy:0.9' -> 0.9; anything else is refused."""
    match = re.fullmatch(r"energy:(\d*\.?\d+)", text.strip())
    fraction = float(match.group(1)) if match else 0.0
    if not 0 < fraction <= 1:
        raise SmileError(f"--expert-rank {text!r}: write an integer rank, or energy:F with 0 < F <= 1 (e.g. energy:0.9).")
    return fraction


def parse_rank(text: str) -> int | str:
    """A command-line rank: '16' -> 16, 'energy:0.9' stays a string (checked by `validate`)."""
    return int(text) if text.strip().isdigit() else text


def resolve_device(name: str) -> str:
    """`auto` -> cuda when present, else cpu; anything but cpu/cuda[:N] is refused."""
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


def command_line(base: str, experts: list[tuple[str, str]], out: str, options: Options) -> str:
    """The `smile-stream convert` command for these inputs and options, shell-quoted."""
    words = ["smile-stream", "convert", "--base", base]
    for name, ref in experts:
        words += ["--expert", f"{name}={ref}"]
    return " ".join(shlex.quote(w) for w in [*words, "--out", out, *options.argv()])
