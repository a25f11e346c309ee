"""The `smile-stream` command line: convert, inspect, verify."""

from __future__ import annotations

import signal
import sys
import tomllib
import traceback
from pathlib import Path

import click

from . import fields
from .errors import SmileError
from .options import Options, flag_name, kind_of

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
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def inspect(folder: Path, debug: bool) -> None:
    """Show a converted model's experts, ranks, parameter overhead and which experts each module holds."""
    from .load import inspect_output

    try:
        click.echo(inspect_output(folder))
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


if __name__ == "__main__":
    main()
