"""The quality study (`make quality`): does the merged model keep every expert's skill?

On the real SmolLM2-135M-Instruct (tools/quality_data.py), one LoRA expert and one full fine-tune
per task are trained (cached under build/quality/), and each of these is scored by exact match
with greedy decoding on the tasks' held-out items, each task alone and all tasks mixed in batches:
the base, each expert on every task, static merges of the LoRA experts (peft's
`add_weighted_adapter`, cat and TIES), peft's Arrow router (the closest zero-shot peer), and SMILE
conversions in each routing mode. Writes build/quality/results.json, a markdown table and a PNG.

    python tools/quality.py                 # train what is missing, then score everything
    python tools/quality.py --only smile    # rescore only the SMILE rows (after a routing change)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from quality_data import real_base  # noqa: E402
from quality_train import train  # noqa: E402

STUDY_TASKS = ["capital", "add", "sort"]
LORA_STEPS, FULL_STEPS = 120, 100


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def experts(work: Path, kind: str) -> dict[str, Path]:
    """{task: trained expert folder} for `kind` ("lora" or "full"), training the missing ones."""
    base = real_base(work / "base")
    steps = LORA_STEPS if kind == "lora" else FULL_STEPS
    out = {}
    for task in STUDY_TASKS:
        start = time.perf_counter()
        out[task] = train(base, task, work / f"{kind}-{task}", kind, steps, log=log)
        log(f"{kind} expert for {task}: {out[task]} ({time.perf_counter() - start:.0f}s)")
    return out


def load_base(work: Path):
    import transformers

    base = real_base(work / "base")
    return transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def lora_model(work: Path, adapters: dict[str, Path], how: str):
    """The base with LoRA experts combined by peft: one adapter ("only:<task>"), a static merge
    ("cat", "ties") or peft's Arrow router ("arrow")."""
    from peft import PeftModel

    base = load_base(work)
    if how.startswith("only:"):
        return PeftModel.from_pretrained(base, str(adapters[how[5:]])).merge_and_unload().eval()
    if how == "arrow":
        from peft import ArrowConfig, create_arrow_model

        return create_arrow_model(base, [str(p) for p in adapters.values()], ArrowConfig(top_k=1, router_temperature=1.0)).eval()
    names = list(adapters)
    model = PeftModel.from_pretrained(base, str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    extra = {"density": 0.5} if how == "ties" else {}
    model.add_weighted_adapter(names, [1.0] * len(names), "merged", combination_type=how, **extra)
    model.set_adapter("merged")
    return model.merge_and_unload(adapter_names=["merged"]).eval()


def smile_folder(work: Path, kind: str, experts_: dict[str, Path]) -> Path:
    from smile_stream import Options, convert

    out = work / f"smile-{kind}"
    rank = None if kind == "lora" else 128
    options = Options(gate_rank=8, top_k=1, expert_rank=rank)  # each routing mode is set when loading
    convert(str(work / "base"), [(t, str(p)) for t, p in experts_.items()], out, options, overwrite=True, quiet=True)
    return out


def score(model, tokenizer, tests: dict[str, list[tuple[str, str]]], mixed: bool, log=log) -> dict[str, float]:
    """Exact-match accuracy per task, by the package's evaluator (`smile-stream evaluate`)."""
    from quality_data import SYSTEM

    from smile_stream.evaluate import Item, evaluate

    start = time.perf_counter()
    items = [Item(task, prompt, answer, SYSTEM) for task, pairs in tests.items() for prompt, answer in pairs]
    results = evaluate(model, tokenizer, items, mixed=mixed, batch=32, max_new_tokens=8, nll=False)
    log(f"    scored {len(items)} items in {time.perf_counter() - start:.0f}s")
    return {task: entry["accuracy"] for task, entry in results.items()}


def study(work: Path, only: str | None) -> dict:
    import transformers
    from quality_data import task_items

    tokenizer = transformers.AutoTokenizer.from_pretrained(work / "base")
    tests = {task: task_items(task, 2000, 100)[1] for task in STUDY_TASKS}
    path = work / "results.json"
    results = json.loads(path.read_text()) if path.exists() and only else {}

    def row(name: str, model, mixed: bool = False, tasks: list[str] | None = None) -> None:
        log(f"  {name}")
        subset = {t: tests[t] for t in (tasks or STUDY_TASKS)}
        entry = results.setdefault(name, {})
        entry.update(score(model, tokenizer, subset, mixed=False, log=log))
        if mixed:
            entry.update({f"{t} (mixed)": v for t, v in score(model, tokenizer, subset, mixed=True, log=log).items()})
        path.write_text(json.dumps(results, indent=1))

    for kind in ("lora", "full"):
        trained = experts(work, kind)
        if only in (None, "baselines"):
            if kind == "lora":
                row("base", load_base(work))
            experts_row = {}
            for task, folder in trained.items():
                model = (
                    lora_model(work, trained, f"only:{task}")
                    if kind == "lora"
                    else transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
                )
                log(f"  {kind} expert {task}")
                experts_row.update(score(model, tokenizer, {task: tests[task]}, mixed=False, log=log))
            results[f"{kind} experts (each on its own task)"] = experts_row
            if kind == "lora":
                for how in ("cat", "ties", "arrow"):
                    row(
                        f"lora {how}" if how != "arrow" else "lora arrow (peft)",
                        lora_model(work, trained, how),
                        mixed=how == "arrow",
                    )
        if only in (None, "smile", "baselines"):
            import smile_stream

            folder = smile_folder(work, kind, trained)
            for mode in ("module", "token", "sequence"):
                row(f"{kind} smile {mode}", smile_stream.load_model(folder, routing=mode).eval(), mixed=True)
    path.write_text(json.dumps(results, indent=1))
    return results


def table(results: dict) -> str:
    tasks = STUDY_TASKS
    lines = [
        "| model | " + " | ".join(tasks) + " | mean | vs experts | mixed batches: " + " / ".join(tasks) + " |",
        "|---" * (len(tasks) + 4) + "|",
    ]
    for kind in ("lora", "full"):
        experts_row = results.get(f"{kind} experts (each on its own task)", {})
        reference = sum(experts_row.get(t, 0) for t in tasks) / len(tasks) if experts_row else None
        for name, entry in results.items():
            if not (name.startswith(kind) or (kind == "lora" and name == "base")):
                continue
            mean = sum(entry.get(t, 0) for t in tasks) / len(tasks)
            mixed = " / ".join(f"{entry[t + ' (mixed)']:.2f}" for t in tasks) if f"{tasks[0]} (mixed)" in entry else "-"
            ratio = f"{mean / reference:.2f}x" if reference else "-"
            lines.append(
                f"| {name} | "
                + " | ".join(f"{entry.get(t, float('nan')):.2f}" for t in tasks)
                + f" | {mean:.2f} | {ratio} | {mixed} |"
            )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(names) + 1.5))
    height = 0.8 / len(STUDY_TASKS)
    for j, task in enumerate(STUDY_TASKS):
        values = [results[n].get(task, 0.0) for n in names]
        ax.barh([i + j * height for i in range(len(names))], values, height=height, label=task)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(names))], names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("exact-match accuracy (held-out items)")
    ax.set_title("SmolLM2-135M-Instruct: experts, merges and SMILE routing modes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("build/quality"))
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--only", choices=["smile", "baselines"], help="rescore only these rows (the rest from results.json)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    experts(args.work, "lora")
    experts(args.work, "full")
    if args.train_only:
        return
    results = study(args.work, args.only)
    markdown = table(results)
    (args.work / "results.md").write_text(markdown + "\n")
    print(markdown)
    try:
        plot(results, args.work / "quality.png")
        print(f"plot: {args.work / 'quality.png'}")
    except ImportError:
        print("(pip install matplotlib for the plot)")


if __name__ == "__main__":
    main()
