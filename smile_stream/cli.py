"""The `smile-stream` command line: convert, inspect, verify, route, evaluate."""

from __future__ import annotations

import signal
import sys
import tomllib
import traceback
from pathlib import Path

import click

from . import fields
from .errors import SmileError
from .modeling_smile import ROUTING_MODES
from .options import Options, flag_name, kind_of, parse_rank

# recipe keys: the Options fields, each taking only its own TOML type ("int", "bool", "str")
RECIPE_OPTIONS = {spec.name: kind_of(spec) for spec in Options.specs()}


def option_flags(command):
    """Click flags for every field of Options: names, types, choices and help come from the field."""
    for spec in reversed(Options.specs()):
        meta = spec.metadata
        settings = {"default": None, "help": meta["help"]}
        if meta["flag"]:
            settings["is_flag"] = True
        elif meta["choices"]:
            settings["type"] = click.Choice(meta["choices"])
        elif meta["kind"] == "rank":
            settings["type"] = click.types.FuncParamType(parse_rank)
        elif kind_of(spec) == "int":
            settings["type"] = int
        command = click.option(flag_name(spec), spec.name, **settings)(command)
    return command


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C (half-written files removed, resumable)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: object) -> None:
    raise Stopped(signum)


def _fail(debug: bool, exc: BaseException) -> None:
    if debug:
        traceback.print_exc()
    if isinstance(exc, SmileError):
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if isinstance(exc, KeyboardInterrupt):
        signum = exc.signum if isinstance(exc, Stopped) else signal.SIGINT
        click.echo(
            f"interrupted ({signal.Signals(signum).name}). Run the same command again to resume from the last finished shard.",
            err=True,
        )
        sys.exit(128 + signum)
    click.echo(
        f"internal error: {type(exc).__name__}: {exc}\nRun again with --debug for the traceback, and please report it.", err=True
    )
    sys.exit(1)


def _load_recipe(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            recipe = tomllib.load(f)
    except OSError as exc:
        raise SmileError(f"recipe {path}: {exc.strerror}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise SmileError(f"recipe {path} is not valid TOML ({exc}).") from None
    known = {"base", "out", "experts", *RECIPE_OPTIONS}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise SmileError(f"recipe {path}: unknown keys {unknown}. Known keys: {sorted(known)}.")
    for key in ("base", "out"):
        if key in recipe:
            fields.check(recipe[key], "str", f"recipe {path}: {key}")
    experts = recipe.get("experts", {})
    if not isinstance(experts, dict) or not all(isinstance(v, str) for v in experts.values()):
        raise SmileError(
            f"recipe {path}: 'experts' must be a table of name = \"path or hub id\" strings. Options such as gate_rank "
            "belong before the [experts] header: in TOML, keys after a header belong to its table."
        )
    return recipe


def _parse_expert(text: str) -> tuple[str, str]:
    name, sep, ref = text.partition("=")
    if not sep or not name or not ref:
        raise SmileError(f"--expert {text!r}: write it as NAME=PATH_OR_HUB_ID, e.g. --expert math=./lora-math.")
    return name, ref


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Turn a base LLM plus LoRA adapters and fine-tunes into one SMILE mixture-of-low-rank-experts model."""


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--base", help="Base model: local folder or hub id.")
@click.option(
    "--expert",
    "experts",
    multiple=True,
    metavar="NAME=PATH",
    help="An expert: LoRA adapter or fine-tuned model (folder or hub id). Repeat.",
)
@click.option("--out", type=click.Path(file_okay=False), help="Output folder.")
@option_flags
@click.option("--dry-run", is_flag=True, help="Print the plan and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder's contents instead of refusing/resuming.")
@click.option("--quiet", is_flag=True, help="No progress output.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def convert(recipe, base, experts, out, dry_run, overwrite, quiet, debug, **flags) -> None:
    """Convert a base model + experts into a SMILE model folder (resumes an unfinished run)."""
    from .convert import convert as run_convert

    try:
        settings = _load_recipe(recipe) if recipe else {}
        base = base or settings.get("base")
        out = out or settings.get("out")
        expert_list = [_parse_expert(e) for e in experts] or [(n, str(r)) for n, r in settings.get("experts", {}).items()]
        if not base:
            raise SmileError("No base model: pass --base PATH_OR_HUB_ID (or set base in the recipe).")
        if not out and not dry_run:
            raise SmileError("No output folder: pass --out FOLDER (or set out in the recipe).")
        values = {k: settings[k] for k in RECIPE_OPTIONS if k in settings}
        values.update({k: v for k, v in flags.items() if v is not None})
        options = Options.from_values(values, f"recipe {recipe}" if recipe else "options")
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _stop)
        run_convert(base, expert_list, out or ".", options, dry_run=dry_run, overwrite=overwrite, quiet=quiet)
    except (SmileError, KeyboardInterrupt, Exception) as exc:  # noqa: BLE001 - turned into a clean message
        _fail(debug, exc)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--png",
    type=click.Path(dir_okay=False),
    help="Plot energy vs rank per module kind (energy-rank folders; needs smile-stream[plot]).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect(folder: Path, png: str | None, debug: bool) -> None:
    """Show a converted model's experts, ranks, parameter overhead and which experts each module holds."""
    from .load import inspect_output, plot_spectra

    try:
        click.echo(inspect_output(folder))
        if png:
            plot_spectra(folder, png)
            click.echo(f"energy plot: {png}")
    except (SmileError, Exception) as exc:  # noqa: BLE001
        _fail(debug, exc)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--deep", is_flag=True, help="Also recompute a sample of modules from the inputs and report reconstruction errors.")
@click.option("--samples", default=4, show_default=True, help="Modules to recompute with --deep.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def verify(folder: Path, deep: bool, samples: int, debug: bool) -> None:
    """Check a converted folder: index vs shards, shapes vs config, checksums vs journal (exit 1 on problems)."""
    from .verify import verify as run_verify

    try:
        problems, report = run_verify(folder, deep=deep, samples=samples)
    except (SmileError, Exception) as exc:  # noqa: BLE001
        _fail(debug, exc)
    for line in report:
        click.echo(line)
    if problems:
        click.echo(f"{len(problems)} problem(s) in {folder}:", err=True)
        for problem in problems:
            click.echo(f"  - {problem}", err=True)
        sys.exit(1)
    click.echo(f"ok: {folder} is complete and consistent")


def _max_memory(text: str | None) -> dict | None:
    """'cpu=2GiB,0=20GiB' -> {"cpu": "2GiB", 0: "20GiB"} (accelerate's max_memory)."""
    if not text:
        return None
    limits = {}
    for part in text.split(","):
        device, sep, size = part.partition("=")
        if not sep or not size.strip():
            raise SmileError(f"--max-memory {text!r}: write it as DEVICE=SIZE pairs, e.g. cpu=8GiB,0=20GiB.")
        device = device.strip()
        limits[int(device) if device.isdigit() else device] = size.strip()
    return limits


def _load_for_running(folder: Path, routing: str | None, run: dict):
    """A converted folder's model (package code, no remote code) and its tokenizer."""
    import transformers

    from .load import load_model

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise SmileError(f"{folder} has no usable tokenizer ({exc}); the base's tokenizer files are copied by convert.") from None
    extra = {"offload_folder": run["offload_folder"]} if run["offload_folder"] else {}
    if run["max_memory"]:
        extra["max_memory"] = _max_memory(run["max_memory"])
    model = load_model(folder, routing=routing, device_map=run["device_map"], **extra).eval()
    return model, tokenizer


def _uses_chat(tokenizer, no_chat_template: bool) -> bool:
    return not no_chat_template and bool(getattr(tokenizer, "chat_template", None))


RUN_OPTIONS = (
    click.option(
        "--no-chat-template", is_flag=True, help="Feed prompts as plain text even when the tokenizer has a chat template."
    ),
    click.option("--device-map", default="auto", show_default=True, help='Where the weights go: "auto", "cpu", "cuda:0", ...'),
    click.option("--offload-folder", type=click.Path(file_okay=False), help="Folder for weights that fit neither GPU nor RAM."),
    click.option(
        "--max-memory", help="Memory for weights per device, e.g. cpu=8GiB or 0=20GiB,cpu=30GiB (the rest is offloaded)."
    ),
    click.option("--debug", is_flag=True, help="Show tracebacks."),
)


def run_options(command):
    for decorate in reversed(RUN_OPTIONS):
        command = decorate(command)
    return command


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(exists=True, dir_okay=False), help="Read the prompt from a file.")
@click.option("--generate", "new_tokens", default=0, type=click.IntRange(0), help="Also route N greedily generated tokens.")
@click.option(
    "--routing",
    "modes",
    multiple=True,
    type=click.Choice(ROUTING_MODES),
    help="Routing mode(s) to show; default: the folder's. Repeat to compare.",
)
@click.option("--png", type=click.Path(dir_okay=False), help="Also draw the heatmap(s) to this PNG (needs smile-stream[plot]).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the routing as JSON.")
@run_options
def route(folder, prompt, prompt_file, new_tokens, modes, png, json_path, **run) -> None:
    """Show which expert each layer routes each token of a prompt to.

    One row per token, one letter per layer: the expert holding most of the layer's routing weight
    (upper case when it holds at least 2/3 of it), then each expert's share.

    \b
    Examples:
      smile-stream route ./smile-out "What is the capital of Peru?"
      smile-stream route ./smile-out "Sort: 5 2 9" --generate 8 --routing module --routing sequence
      smile-stream route ./smile-out --prompt-file prompt.txt --png routing.png --json routing.json
    """
    import json

    from .evaluate import encode
    from .route import plot, render, route_prompt

    try:
        if prompt_file:
            prompt = Path(prompt_file).read_text(encoding="utf-8")
        if not prompt:
            raise SmileError("No prompt: pass it as an argument or with --prompt-file FILE.")
        model, tokenizer = _load_for_running(folder, None, run)
        ids, _ = encode(tokenizer, prompt, chat=_uses_chat(tokenizer, run["no_chat_template"]))
        routings = []
        for mode in modes or [model.config.smile.get("routing", "module")]:
            model.set_smile_routing(mode)
            routings.append(route_prompt(model, tokenizer, ids, new_tokens))
            click.echo(render(routings[-1], colour=sys.stdout.isatty()) + "\n")
        if png:
            plot(routings, Path(png))
            click.echo(f"heatmap: {png}")
        if json_path:
            Path(json_path).write_text(json.dumps([r.as_json() for r in routings], indent=1))
    except (SmileError, Exception) as exc:  # noqa: BLE001
        _fail(run["debug"], exc)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--tasks",
    "tasks_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help='JSONL: {"task": ..., "prompt": ..., "answer": ...} per line.',
)
@click.option("--experts", "with_inputs", is_flag=True, help="Also score the base and each expert the folder was made from.")
@click.option(
    "--source",
    "sources",
    multiple=True,
    metavar="NAME=PATH",
    help="Where an input is now (NAME: base or an expert), if not where config.json says.",
)
@click.option("--mixed", is_flag=True, help="Shuffle all tasks' items together into the batches (as a server would see them).")
@click.option("--routing", type=click.Choice(ROUTING_MODES), help="Routing mode of the SMILE model (default: the folder's).")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--max-new-tokens", default=16, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write the results as JSON.")
@click.option(
    "--png", type=click.Path(dir_okay=False), help="Also draw a bar chart of the accuracies (needs smile-stream[plot])."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@run_options
def evaluate(
    folder, tasks_path, with_inputs, sources, mixed, routing, batch_size, max_new_tokens, json_path, png, quiet, **run
) -> None:
    """Score a SMILE model (and with --experts its inputs) on your own tasks.

    Per task: exact-match accuracy of greedy answers, the answer's mean NLL per token, and, where a
    task is named like an expert, the share of its answer tokens' routing that went to that expert.

    \b
    Examples:
      smile-stream evaluate ./smile-out --tasks tasks.jsonl
      smile-stream evaluate ./smile-out --tasks tasks.jsonl --experts --mixed --png scores.png --json scores.json
    """
    import json

    from .evaluate import bar_chart, input_models, read_tasks, table
    from .evaluate import evaluate as run_evaluate

    try:
        items = read_tasks(tasks_path)
        overrides = dict(_parse_expert(s) for s in sources)
        model, tokenizer = _load_for_running(folder, routing, run)
        chat = _uses_chat(tokenizer, run["no_chat_template"])
        settings = dict(chat=chat, mixed=mixed, batch=batch_size, max_new_tokens=max_new_tokens)

        def scored(name: str, model) -> dict:
            with click.progressbar(length=len(items), label=f"{name:<12}", file=sys.stderr, hidden=quiet) as bar:
                return run_evaluate(model, tokenizer, items, progress=bar.update, **settings)

        results = {"smile": scored("smile", model)}
        del model
        if with_inputs:
            extra = {} if run["device_map"] == "auto" else {"device_map": run["device_map"]}
            for name, other in input_models(folder, overrides, **extra):
                results[name] = scored(name, other)
                del other
        click.echo(table(results))
        if json_path:
            Path(json_path).write_text(json.dumps(results, indent=1))
        if png:
            bar_chart(results, Path(png))
            click.echo(f"chart: {png}")
    except (SmileError, Exception) as exc:  # noqa: BLE001
        _fail(run["debug"], exc)


if __name__ == "__main__":
    main()
