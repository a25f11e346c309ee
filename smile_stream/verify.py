"""Verify: check that a converted folder is complete and consistent, and optionally recompute a sample.

Checks: the index and the shards agree (every tensor exactly once, headers valid, total_size
right); the tensors are the ones the config implies, with the right shapes and dtypes (checked
against the SMILE model built with empty weights); shard checksums match the journal; with
`deep`, a sample of modules is recomputed from the inputs and the reconstruction error reported.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import fields
from .architecture import ModelTensors
from .errors import SmileError
from .experts import open_expert
from .load import check_smile_section, model_class
from .modeling_smile import EXPERT_TENSORS, INDEX_FILE, check_format, unpack_factors
from .output import JOURNAL, REMOTE_CODE, read_journal
from .sources import HASH_CHUNK, file_sha256, input_path, load_json, open_source
from .tensors import DTYPES, FLOAT_CODES, TensorInfo, read_safetensors_header


def verify(folder: str | Path, deep: bool = False, samples: int = 4) -> tuple[list[str], list[str]]:
    """Returns (problems, report lines). No problems means the folder is complete and consistent.

    A file that cannot be read at all (config.json, the index or a shard that is not valid JSON or
    safetensors, or whose fields have the wrong types) raises a SmileError naming it instead.
    """
    folder = Path(folder)
    problems: list[str] = []
    report: list[str] = []
    config_path = folder / "config.json"
    if not config_path.is_file():
        return [f"{config_path} is missing: this is not a converted model folder"], report
    config = load_json(config_path, "model config")
    smile = config.get("smile")
    if not isinstance(smile, dict):
        return [f"{config_path} has no 'smile' section: this folder was not made by smile-stream"], report
    try:
        check_format(smile)
    except ValueError as exc:
        return [f"{folder}: {exc}"], report
    check_smile_section(smile, config_path)

    partial = sorted(p.name for p in folder.glob("*.partial"))
    if partial:
        problems.append(f"half-written files {partial}: the conversion is unfinished (re-run it to resume)")
    if not (folder / INDEX_FILE).is_file():
        problems.append(f"{INDEX_FILE} is missing: the conversion is unfinished (re-run it to resume)")
        return problems, report
    index = load_json(folder / INDEX_FILE, "weights index")
    weight_map = fields.get(index, "weight_map", "dict", folder / INDEX_FILE)
    for name, shard in weight_map.items():
        fields.check(shard, "str", f"{folder / INDEX_FILE}: weight_map[{name!r}]")
    fields.get(index, "metadata", "dict", folder / INDEX_FILE, {})
    tensors = _check_shards(folder, index, problems)
    _check_against_model(folder, tensors, problems)
    _check_smile_tensors(smile, tensors, problems)
    _check_journal(folder, index, problems, report)
    if deep and not problems:
        report += _deep_check(smile, tensors, samples, problems)
    report.insert(0, f"{len(tensors)} tensors in {len(set(weight_map.values()))} shard(s), {len(smile['modules'])} SMILE modules")
    return problems, report


def _check_shards(folder: Path, index: dict, problems: list[str]) -> dict[str, TensorInfo]:
    weight_map = index["weight_map"]
    found: dict[str, TensorInfo] = {}
    for shard in sorted(set(weight_map.values())):
        path = input_path(folder, shard, "the shard")
        if not path.is_file():
            problems.append(f"shard {shard} named by the index is missing")
            continue
        header = read_safetensors_header(path)  # a shard that is not valid safetensors: SmileError
        for name, info in header.tensors.items():
            if name in found:
                problems.append(f"tensor {name} is in both {Path(found[name].file).name} and {shard}")
            elif weight_map.get(name) != shard:
                problems.append(f"tensor {name} is in {shard} but the index says {weight_map.get(name)}")
            found[name] = info
    for name, shard in weight_map.items():
        if name not in found and (folder / shard).is_file():
            problems.append(f"the index puts tensor {name} in {shard}, which does not hold it")
    total = sum(t.nbytes for t in found.values())
    if index.get("metadata", {}).get("total_size") != total:
        problems.append(
            f"index metadata.total_size is {index.get('metadata', {}).get('total_size')} but the shards hold {total} tensor bytes"
        )
    return found


def _check_against_model(folder: Path, tensors: dict[str, TensorInfo], problems: list[str]) -> None:
    # The model the config describes, built with empty weights, says which tensors must exist and
    # their shapes: the same rules convert applies to its base (ModelTensors).
    from accelerate import init_empty_weights

    try:
        cls, config = model_class(folder)
        with init_empty_weights():
            model = cls(config)
    except Exception as exc:  # noqa: BLE001 - any failure is a config problem worth reporting
        problems.append(f"config.json does not build a model ({type(exc).__name__}: {exc})")
        return
    missing, extra = ModelTensors.of(model).problems({n: t.shape for n, t in tensors.items()})
    problems += [f"{problem} from the shards" if problem.endswith("missing") else problem for problem in missing]
    problems += [f"tensor {name} in the shards is not a parameter of the model the config describes" for name in extra]


def _check_smile_tensors(smile: dict, tensors: dict[str, TensorInfo], problems: list[str]) -> None:
    for name, spec in smile["modules"].items():
        if len(spec["experts"]) != len(spec["ranks"]) or not spec["experts"]:
            problems.append(f"config smile.modules[{name}] lists {len(spec['experts'])} experts but {len(spec['ranks'])} ranks")
        for suffix in EXPERT_TENSORS:
            info = tensors.get(f"{name}.{suffix}")
            if info is not None and info.dtype not in FLOAT_CODES:
                problems.append(f"tensor {info.name} has dtype {info.dtype}; expert factors must be floating point")
            if info is not None and not _finite(info):
                problems.append(f"tensor {info.name} holds NaN or Inf")


def _finite(info: TensorInfo) -> bool:
    from safetensors import safe_open

    with safe_open(info.file, "pt") as f:
        return bool(torch.isfinite(f.get_tensor(info.name)).all())


def _check_journal(folder: Path, index: dict, problems: list[str], report: list[str]) -> None:
    journal = read_journal(folder)  # a journal of the wrong shape: SmileError naming the field
    if journal is None:
        problems.append(f"{JOURNAL} is missing: shard checksums cannot be checked")
        return
    if journal["plan_hash"] != index.get("metadata", {}).get("smile_plan_hash"):
        problems.append(
            f"{JOURNAL} is for plan {journal['plan_hash'][:12]} but the index for {str(index.get('metadata', {}).get('smile_plan_hash'))[:12]}"
        )
    for shard in sorted(set(index["weight_map"].values())):
        entry = journal["shards"].get(shard)
        path = folder / shard
        if entry is None:
            problems.append(f"{JOURNAL} has no checksum for {shard}")
        elif entry.get("placed") is not None and path.is_file():
            _check_placed(path, entry, problems, report)
        elif path.is_file() and file_sha256(path) != entry["sha256"]:
            problems.append(f"{shard}: sha256 does not match the journal (the file changed or is corrupted)")
    metadata = journal.get("metadata", {})
    for name in ("config.json", REMOTE_CODE):
        if name not in metadata:
            problems.append(
                f"{JOURNAL} has no digest of {name} (an older smile-stream wrote it): run the same convert command again "
                "to record it"
            )
    for name, digest in sorted(metadata.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing (the conversion wrote it)")
        elif file_sha256(path) != digest:
            problems.append(f"{name} differs from what the conversion wrote (edited or tampered with)")
    report.append(
        f"checksums of {len(journal['shards'])} shard(s) and {len(metadata)} metadata file(s) checked against {JOURNAL}"
    )


def _check_placed(path: Path, entry: dict, problems: list[str], report: list[str]) -> None:
    """A base file placed whole (`--base-files`): the same bytes as its source, unchanged since."""
    where = f"{JOURNAL}: shards[{path.name!r}]"
    source = Path(fields.get(entry, "source", "str", where))
    how = fields.get(entry, "placed", "str", where)
    stat = path.stat()
    if stat.st_size != entry["size"]:
        problems.append(f"{path.name}: {stat.st_size} bytes, but {entry['size']} were placed ({how} of {source})")
    elif how == "hard link" and stat.st_mtime_ns != fields.get(entry, "mtime_ns", "int", where, stat.st_mtime_ns):
        problems.append(
            f"{path.name} is a hard link to {source}, and that file was modified after the conversion: the base was "
            "edited in place (they share their bytes); convert again"
        )
    elif source.is_file() and source.stat().st_ino == stat.st_ino and source.stat().st_dev == stat.st_dev:
        report.append(f"{path.name}: hard link to {source}, unchanged since the conversion")
    elif source.is_file():
        with open(source, "rb") as a, open(path, "rb") as b:
            while True:
                left, right = a.read(HASH_CHUNK), b.read(HASH_CHUNK)
                if left != right:
                    problems.append(f"{path.name} differs from {source}, the base file it was placed from ({how})")
                    break
                if not left:
                    break
    else:
        report.append(f"{path.name}: placed by {how} from {source}, which is gone: its bytes cannot be compared")


def _deep_check(smile: dict, tensors: dict[str, TensorInfo], samples: int, problems: list[str]) -> list[str]:
    """Recompute a few modules' deltas from the inputs and compare with the stored factors."""
    from safetensors import safe_open

    names = sorted(smile["modules"])
    picked = [names[round(i * (len(names) - 1) / max(samples - 1, 1))] for i in range(min(samples, len(names)))]
    try:
        base = open_source(smile["base"])
        experts = {e["name"]: open_expert(e["name"], e["source"]) for e in smile["experts"]}
    except SmileError as exc:
        problems.append(f"--deep needs the conversion's inputs: {exc}")
        return []
    lines = []
    for name in dict.fromkeys(picked):
        spec = smile["modules"][name]
        down_info, up_info = tensors[name + ".expert_down"], tensors[name + ".expert_up"]
        with safe_open(down_info.file, "pt") as f:
            down = f.get_tensor(down_info.name).double()
        with safe_open(up_info.file, "pt") as f:
            up = f.get_tensor(up_info.name).double()
        factors = unpack_factors(down, up, spec["ranks"], smile["gate_rank"])
        base_weight = base.read(name + ".weight").double()
        for expert_name, rank, (expert_down, expert_up) in zip(spec["experts"], spec["ranks"], factors):
            delta = torch.empty_like(base_weight)
            experts[expert_name].write_delta(name, base_weight, delta)
            approx = expert_up @ expert_down

            norm = float(torch.linalg.norm(delta)) or 1.0
            error = float(torch.linalg.norm(delta - approx)) / norm
            tail = torch.linalg.svdvals(delta)[rank:]
            optimal = float(torch.linalg.norm(tail)) / norm
            tolerance = optimal * 1.02 + 10 * torch.finfo(DTYPES[down_info.dtype]).eps
            lines.append(
                f"deep     {name} / {expert_name} (rank {rank}): relative error {error:.3e}, optimal at this rank {optimal:.3e}"
            )
            if error > tolerance:
                problems.append(
                    f"{name} / {expert_name}: reconstruction error {error:.3e} exceeds the optimal {optimal:.3e} at rank {rank}"
                )
    return lines
