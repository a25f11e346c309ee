"""Expert kinds: how each kind of fine-tune becomes low-rank SMILE factors.

One class per kind behind one small interface, picked from `KINDS` by `open_expert` (the way
peft picks a LoRA variant). A kind says which target modules it touches and at which natural
rank, how its delta reaches the factorizer (LoRA operands for the exact QR-core engine, or a
dense delta for the truncated-SVD engine), its bias deltas, what to read ahead, and which
non-target tensors it changed. Plan, factorize, convert and verify loop over experts without
asking what kind they are.

To add a kind: subclass `Expert`, set `kind`, `engine` and `reads` (or override `accepts`),
implement the methods its engine needs, and put it in `KINDS` before the kinds it refines.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .errors import SmileError
from .sources import ADAPTER_WEIGHTS, Checkpoint, LoraAdapter, open_source
from .tensors import TensorInfo

DEFAULT_FULL_EXPERT_RANK = 128
# the config.json fields that must agree between a base and its full fine-tunes
ARCHITECTURE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)

# targets: {module name: (in_features, out_features, decoder block)}
Targets = dict[str, tuple[int, int, int]]


class Expert:
    """One expert of a conversion: its name, its input folder, and what its kind does with them."""

    kind: ClassVar[str]
    engine: ClassVar[str]  # "qr": exact factors from LoRA operands; "svd": truncated SVD of a dense delta
    reads: ClassVar[type]  # the kind of input folder it is made from
    source: Checkpoint | LoraAdapter

    def __init__(self, name: str, source: Checkpoint | LoraAdapter):
        self.name, self.source = name, source

    @classmethod
    def accepts(cls, source: Checkpoint | LoraAdapter) -> bool:
        return isinstance(source, cls.reads)

    def touches(self, base: Checkpoint, linears: dict, targets: Targets) -> tuple[dict[str, int], set[str]]:
        """{target module it changes: the delta's largest possible rank}, and the modules whose bias
        it changes. Validates the expert against the base (from headers, plus cheap data probes)."""
        raise NotImplementedError

    def rank(self, module: str, natural: int, expert_rank: int | None) -> int:
        """The rank its factors get at `module`, given `--expert-rank` (None: the kind's default)."""
        raise NotImplementedError

    def operands(self, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A, B, scale) with delta = scale * B @ A, for the "qr" engine."""
        raise NotImplementedError

    def write_delta(self, module: str, base_weight: torch.Tensor, out: torch.Tensor) -> None:
        """Fill `out` with the dense weight delta of `module` (in the dtype and on the device of
        `base_weight`), for the "svd" engine and for `verify --deep`."""
        a, b, scale = self.operands(module, base_weight.device)
        torch.mm(b.to(base_weight.dtype), a.to(base_weight.dtype), out=out).mul_(scale)

    def bias_delta(self, module: str, base_bias: torch.Tensor) -> torch.Tensor | None:
        """b_i - b0 at `module` (float32), or None when this kind never changes biases."""
        return None

    def read_ahead(self, module: str) -> list[TensorInfo]:
        """The tensors of `module` worth prefetching into the page cache before its layer is factored."""
        return []

    def changed_non_targets(self, base: Checkpoint, targets: Targets, aliases: dict[str, str]) -> tuple[dict, dict]:
        """({non-target tensor: relative difference to the base}, {tensor only this expert has: why it is dropped})."""
        return {}, {}

    def check_architecture(self, base: Checkpoint) -> None:
        """Refuse an expert of another architecture than the base (beyond what `touches` sees)."""

    def average_source(self) -> Checkpoint | None:
        """The checkpoint whose non-target tensors `--non-linear average` averages, if any."""
        return None


class LoraExpert(Expert):
    """A PEFT LoRA adapter: delta = scale * B @ A, factored exactly from A and B."""

    kind, engine, reads = "lora", "qr", LoraAdapter
    source: LoraAdapter

    @classmethod
    def accepts(cls, source: Checkpoint | LoraAdapter) -> bool:
        return super().accepts(source) and not source.dora

    def touches(self, base: Checkpoint, linears: dict, targets: Targets) -> tuple[dict[str, int], set[str]]:
        adapter, where = self.source, self.source.folder / ADAPTER_WEIGHTS
        touched = {}
        for module, lora in adapter.modules.items():
            if module not in linears:
                raise SmileError(
                    f"{where}: expert {self.name!r} adapts {module!r}, which is not a module of the base model. Is this adapter for a different base?"
                )
            if module not in targets:
                raise SmileError(
                    f"{where}: expert {self.name!r} adapts {module!r}, which is not a target. Widen --targets to include it, or use an adapter without it."
                )
            fan_in, fan_out, _ = targets[module]
            if lora.a.shape[1] != fan_in or lora.b.shape[0] != fan_out:
                raise SmileError(
                    f"{where}: expert {self.name!r}, module {module!r}: lora_A/lora_B map {lora.a.shape[1]} -> {lora.b.shape[0]} "
                    f"features, but the base layer maps {fan_in} -> {fan_out}. The adapter was trained on a different base."
                )
            if self._changes(module):
                touched[module] = min(lora.rank, fan_in, fan_out)  # a delta of an (out, in) layer has rank <= min(in, out)
        if not touched:
            raise SmileError(
                f"{adapter.folder}: expert {self.name!r} is equal to the base: every lora_A or lora_B is zero "
                "(an untrained adapter?). Remove it."
            )
        return touched, set()

    def _changes(self, module: str) -> bool:
        lora = self.source.modules[module]
        return not self.source.is_zero(lora.a) and not self.source.is_zero(lora.b)

    def rank(self, module: str, natural: int, expert_rank: int | None) -> int:
        return min(natural, expert_rank or natural)  # a LoRA delta has rank r at most: a larger rank keeps it whole

    def operands(self, module: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
        lora = self.source.modules[module]
        return self.source.read(lora.a).to(device), self.source.read(lora.b).to(device), lora.scale


class DoraExpert(LoraExpert):
    """A PEFT DoRA adapter: W' = W0 + scale * B @ A, rescaled row by row to the learned magnitude m,
    so delta = (m / ||W'||_row) * W' - W0: dense, factored by the truncated SVD like a full fine-tune.
    Its default rank is the adapter's r (the magnitude's change is approximated at that rank)."""

    kind, engine = "dora", "svd"

    @classmethod
    def accepts(cls, source: Checkpoint | LoraAdapter) -> bool:
        return isinstance(source, LoraAdapter) and source.dora

    def touches(self, base: Checkpoint, linears: dict, targets: Targets) -> tuple[dict[str, int], set[str]]:
        touched, _ = super().touches(base, linears, targets)
        return {module: min(targets[module][:2]) for module in touched}, set()

    def _changes(self, module: str) -> bool:
        return True  # even with B = 0 the magnitude rescales the base weight

    def rank(self, module: str, natural: int, expert_rank: int | None) -> int:
        return min(natural, expert_rank or self.source.modules[module].rank)

    def write_delta(self, module: str, base_weight: torch.Tensor, out: torch.Tensor) -> None:
        lora = self.source.modules[module]
        a, b, scale = self.operands(module, base_weight.device)
        out.copy_(base_weight).addmm_(b.to(out.dtype), a.to(out.dtype), alpha=scale)  # W'
        magnitude = self.source.read(lora.magnitude).to(out.device, out.dtype)
        out.mul_((magnitude / torch.linalg.vector_norm(out, dim=1)).unsqueeze(1)).sub_(base_weight)


class FullExpert(Expert):
    """A full fine-tune: delta = W_i - W0 per target module, factored by a truncated SVD."""

    kind, engine, reads = "full", "svd", Checkpoint
    source: Checkpoint

    def check_architecture(self, base: Checkpoint) -> None:
        config = self.source.folder / "config.json"
        for key in ARCHITECTURE_FIELDS:
            if key in base.config and self.source.config.get(key) != base.config[key]:
                raise SmileError(
                    f"{config}: expert {self.name!r} has {key} = {self.source.config.get(key)!r} but the base has "
                    f"{base.config[key]!r}. Experts must be fine-tunes of the base (same architecture and sizes)."
                )
        vocab, base_vocab = self.source.config.get("vocab_size"), base.config.get("vocab_size")
        if isinstance(vocab, int) and isinstance(base_vocab, int) and vocab < base_vocab:
            raise SmileError(
                f"{config}: expert {self.name!r} has vocab_size = {vocab} but the base has {base_vocab}. An expert may add "
                "tokens to the base's vocabulary, not remove them."
            )

    def touches(self, base: Checkpoint, linears: dict, targets: Targets) -> tuple[dict[str, int], set[str]]:
        expert = self.source
        for tensor, info in base.tensors.items():
            other = expert.tensors.get(tensor)
            if other is None:
                raise SmileError(
                    f"{expert.folder}: expert {self.name!r} has no tensor {tensor!r}, which the base has. Is it a fine-tune of this base?"
                )
            if other.shape != info.shape and not _added_tokens(info, other, targets):
                raise SmileError(
                    f"{other.file}: expert {self.name!r}, tensor {tensor!r} has shape {list(other.shape)} but the base's is {list(info.shape)}. Is it a fine-tune of this base (same architecture and vocabulary)?"
                )
            if other.dtype != info.dtype:
                raise SmileError(
                    f"{other.file}: expert {self.name!r}, tensor {tensor!r} is {other.dtype} but the base's is {info.dtype}. Save both in the same dtype."
                )
        touched, bias_changed = {}, set()
        for module, (fan_in, fan_out, _) in targets.items():
            if bytes_differ(base.tensors[module + ".weight"], expert.tensors[module + ".weight"]):
                touched[module] = min(fan_in, fan_out)
            bias = module + ".bias"
            if bias in base.tensors and bytes_differ(base.tensors[bias], expert.tensors[bias]):
                touched.setdefault(module, min(fan_in, fan_out))
                bias_changed.add(module)
        if not touched:
            raise SmileError(
                f"{expert.folder}: expert {self.name!r} has the same weights as the base in every target module. Remove it."
            )
        return touched, bias_changed

    def rank(self, module: str, natural: int, expert_rank: int | None) -> int:
        if expert_rank and expert_rank > natural:
            raise SmileError(
                f"--expert-rank {expert_rank} is larger than module {module} allows for full expert {self.name!r}: "
                f"its delta is {natural} wide at most (min of out and in features). Use --expert-rank {natural} or less."
            )
        return min(natural, expert_rank or DEFAULT_FULL_EXPERT_RANK)

    def write_delta(self, module: str, base_weight: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(self.source.read(module + ".weight")).sub_(base_weight)

    def bias_delta(self, module: str, base_bias: torch.Tensor) -> torch.Tensor | None:
        return self.source.read(module + ".bias").float() - base_bias

    def read_ahead(self, module: str) -> list[TensorInfo]:
        return [self.source.tensors[module + ".weight"]]

    def average_source(self) -> Checkpoint | None:
        return self.source

    def changed_non_targets(self, base: Checkpoint, targets: Targets, aliases: dict[str, str]) -> tuple[dict, dict]:
        target_tensors = {m + s for m in targets for s in (".weight", ".bias")}
        source = self.source
        changed, expert_only = {}, {}
        for name, info in base.tensors.items():
            if name not in target_tensors and bytes_differ(info, source.tensors[name]):
                changed[name] = relative_difference(base.read(name), source.read(name))
        for name in sorted(set(source.tensors) - set(base.tensors)):
            tied_to = aliases.get(name)
            if tied_to in base.tensors:  # e.g. lm_head of an expert fine-tuned with untied embeddings
                difference = relative_difference(base.read(tied_to), source.read(name))
                if difference:
                    changed[name] = difference
                expert_only[name] = (
                    f"the base ties it to {tied_to}, so the output keeps that tie and cannot hold an expert's own {name} "
                    "(with --non-linear average too)"
                )
            else:
                changed[name] = float("inf")
                expert_only[name] = "the base has no such tensor"
        return changed, expert_only


# Tried in order: a kind that refines another comes first.
KINDS: tuple[type[Expert], ...] = (DoraExpert, LoraExpert, FullExpert)


def open_expert(name: str, ref: str, allow_pickle: bool = False) -> Expert:
    """The expert at `ref` (folder or hub id), as the first kind in `KINDS` that accepts it."""
    source = open_source(ref, allow_pickle)
    kind = next(k for k in KINDS if k.accepts(source))
    return kind(name, source)


def _added_tokens(base: TensorInfo, other: TensorInfo, targets: Targets) -> bool:
    """A non-target table (embeddings, lm_head) with extra rows: an expert that added tokens.
    Its first rows line up with the base's; the added rows are not used (the base tokenizer is kept)."""
    module = base.name.rsplit(".", 1)[0]
    return module not in targets and other.shape[1:] == base.shape[1:] and other.shape[0] > base.shape[0]


def bytes_differ(a: TensorInfo, b: TensorInfo, chunk: int = 1 << 24) -> bool:
    """Whether two tensors' bytes differ. Fine-tunes almost always differ in the first bytes, so
    this rarely reads more than a page."""
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


def relative_difference(w0: torch.Tensor, w1: torch.Tensor, rows: int = 4096) -> float:
    """||w1 - w0|| / ||w0|| over the base's rows (an expert with added tokens has more)."""
    # Row blocks keep float64 copies of a large embedding table small.
    w1 = w1[: w0.shape[0]] if w0.dim() else w1
    if w0.dim() == 0:
        w0, w1 = w0.view(1), w1.view(1)
    diff = norm = 0.0
    for start in range(0, w0.shape[0], rows):
        a, b = w0[start : start + rows].double(), w1[start : start + rows].double()
        diff += float((b - a).pow(2).sum())
        norm += float(a.pow(2).sum())
    return (diff / norm) ** 0.5 if norm else float("inf")
