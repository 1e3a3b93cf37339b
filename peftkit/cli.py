"""The ``peftkit`` command line. Each command parses, calls one library function, prints a summary.

Only click is imported at module level: ``peftkit --help`` must not pay for torch.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

SET_HELP = "Override a recipe value: table.key=value (TOML syntax; repeatable)."
TRUST_HELP = (
    "Honour model.trust_remote_code = true recorded in the run (runs code shipped with its model); "
    "a received run cannot switch it on by itself."
)


NOISY_LOGGERS = (
    "transformers",
    "datasets",
    "peft",
    "accelerate",
    "torch",
    "httpx",
    "filelock",
    "matplotlib",
)


def _setup_logging() -> None:
    """peftkit's own messages at INFO; libraries only when something is wrong. Imports nothing heavy."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # in a distributed launch only rank 0 reports progress; the other ranks speak up on problems only
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="peftkit: %(message)s", stream=sys.stderr)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _quiet_libraries(recipe: Any = None) -> None:
    """Keep the console for peftkit's own progress and summary (``recipe``: the run's, whose DeepSpeed and
    4-bit settings decide which library notices apply; see :mod:`peftkit.console`)."""
    import warnings

    from peftkit.console import configure_library, quiet_libraries

    quantization = getattr(recipe, "quantization", None)
    quiet_libraries(
        deepspeed=bool(recipe is not None and recipe.train.get("deepspeed")),
        four_bit=quantization is not None and quantization.bits == 4,
    )

    # peft calls a transformers method deprecated for v6 on every adapter load; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # EncoderDecoderModel warns on every forward with labels about a change made in transformers 4.12
    warnings.filterwarnings("ignore", message=r"Version v4\.12\.0 introduces", category=FutureWarning)
    configure_library(
        "transformers",
        {"TRANSFORMERS_VERBOSITY": "error"},
        lambda m: m.utils.logging.set_verbosity_error(),
    )
    configure_library(
        "datasets", {"DATASETS_VERBOSITY": "error"}, lambda m: m.utils.logging.set_verbosity_error()
    )


def user_errors(func: F) -> F:
    """Print a PeftkitError's message (no traceback) and exit with its code (2)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from peftkit.errors import PeftkitError

        try:
            return func(*args, **kwargs)
        except PeftkitError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except Exception as exc:  # disk full, read-only folder ...: one message naming the path
            from peftkit.outputs import storage_error

            error = storage_error(exc)
            if error is None:
                raise
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)

    return wrapper  # type: ignore[return-value]


def run() -> None:
    """The ``peftkit`` program (console script, ``python -m peftkit``): :func:`main` in its own process.

    Only then may a command trade the process's later use for speed (``validate`` keeps bitsandbytes
    unimported); called in-process (click's test runner, a notebook), the commands leave the process as
    they found it.
    """
    main(prog_name="peftkit", obj={"own_process": True})


def _own_process() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context is not None and isinstance(context.obj, dict) and context.obj.get("own_process"))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peftkit")
def main() -> None:
    """peftkit: parameter-efficient fine-tuning from one TOML recipe.

    \b
    peftkit validate recipes/seq_cls_lora.toml
    peftkit finetune recipes/seq_cls_lora.toml
    peftkit predict runs/seq_cls_lora --input texts.jsonl --output preds.jsonl
    """
    _setup_logging()


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--resume", is_flag=True, help="Continue from the run directory's newest checkpoint.")
@user_errors
def finetune(recipe: Path, overrides: tuple[str, ...], overwrite: bool, resume: bool) -> None:
    """Fine-tune the recipe's model with its adapter; write the run directory."""
    from peftkit.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)  # validate before any heavy import
    _quiet_libraries(loaded)
    from peftkit.training import finetune as run_finetune

    result = run_finetune(loaded, overwrite=overwrite, resume=resume)
    from peftkit.lifecycle import leave_process_group
    from peftkit.runs import is_main_process

    leave_process_group()  # a distributed launch: all ranks end together, after rank 0 saved
    if is_main_process():
        click.echo(f"\nRun directory: {result.run_dir}")
        for split in ("validation", "test"):
            if split in result.metrics:
                click.echo(f"{split:>10}: {_format_metrics(result.metrics[split])}")
        click.echo(
            f"  trainable: {result.metrics['trainable_params']:,} of "
            f"{result.metrics['total_params']:,} params; "
            f"{result.metrics['wall_time_s']} s; peak RSS {result.metrics['peak_rss_mb']} MB"
        )
        click.echo(f"  {result.kept}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)
@user_errors
def validate(recipe: Path, overrides: tuple[str, ...]) -> None:
    """Check a recipe (no weights are loaded) and print it resolved, defaults included.

    Besides the recipe's own rules, builds its TrainingArguments, its peft config and the model from its
    config on the meta device, and says how many modules each target pattern matched.
    """
    from peftkit.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries()
    from peftkit.preflight import check_recipe, leave_bitsandbytes_unimported

    if _own_process():
        leave_bitsandbytes_unimported(loaded)
    found = check_recipe(loaded)
    click.echo(f"# {recipe}: valid ({loaded.task_name}, adapter {loaded.adapter['method']})")
    for line in found:
        click.echo(line)
    click.echo(json.dumps(loaded.to_dict(), indent=2, default=str))


@main.group()
def recipes() -> None:
    """List, show and copy the shipped recipes."""


@recipes.command("list")
@user_errors
def recipes_list() -> None:
    """The shipped recipes: name, task and what each does (run one with `peftkit finetune NAME`)."""
    from peftkit.errors import PeftkitError
    from peftkit.recipe import recipe_summary, recipes_dir

    paths = sorted(recipes_dir().glob("*.toml"))
    if not paths:
        raise PeftkitError(
            f"no shipped recipes found in {recipes_dir()}: this installation is incomplete; reinstall peftkit"
        )
    for path in paths:
        task, summary = recipe_summary(path)
        click.echo(f"{path.stem:<22} {task:<10} {summary}")


@recipes.command("show")
@click.argument("name")
@user_errors
def recipes_show(name: str) -> None:
    """Print a shipped recipe."""
    click.echo(_shipped(name).read_text(), nl=False)


@recipes.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace DEST if it exists.")
@user_errors
def recipes_copy(name: str, dest: Path, overwrite: bool) -> None:
    """Copy a shipped recipe to DEST (a file or a folder), with its paths rewritten to stay valid."""
    from peftkit.errors import PeftkitError
    from peftkit.runs import write_text_atomic

    source = _shipped(name)
    target = dest / source.name if dest.is_dir() else dest
    if target.exists() and not overwrite:
        raise PeftkitError(f"{target}: exists; use --overwrite to replace it")
    text = _rebase_paths(source.read_text(), source.parent, target.parent.resolve())
    write_text_atomic(target, text)
    click.echo(f"copied {name} to {target}")


def _shipped(name: str) -> Path:
    from peftkit.errors import PeftkitError
    from peftkit.recipe import did_you_mean, recipes_dir, shipped_recipes

    path = recipes_dir() / f"{Path(name).stem}.toml"
    if not path.is_file():
        hint = did_you_mean(name, shipped_recipes())
        raise PeftkitError(f"no shipped recipe {name!r}; {hint or 'see `peftkit recipes list`'}")
    return path


def _rebase_paths(text: str, old: Path, new: Path) -> str:
    """Relative data paths in a copied recipe are rewritten against its new folder."""
    import re

    def fix(match: re.Match[str]) -> str:
        key, quote, value = match.group(1), match.group(2), match.group(3)
        if not value.startswith("."):
            return match.group(0)
        absolute = (old / value).resolve()
        return f"{key}{quote}{os.path.relpath(absolute, new)}{quote}"

    keys = "dataset|train_file|validation_file|test_file|name_or_path|decoder_name_or_path|tokenizer"
    pattern = rf'^((?:{keys})\s*=\s*)(["\'])([^"\']*)\2'
    return re.sub(pattern, fix, text, flags=re.MULTILINE)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True, help="Which split of the run's data.")
@click.option("--errors", type=int, default=None, metavar="N", help="Also write the worst N examples.")
@click.option(
    "--errors-output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File for --errors (default: RUN_DIR/errors_<split>.jsonl).",
)
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
@user_errors
def evaluate(
    run_dir: Path, split: str, errors: int | None, errors_output: Path | None, trust_remote_code: bool
) -> None:
    """Re-evaluate a run directory on a split of its recipe's data."""
    _quiet_libraries()
    from peftkit.evaluation import evaluate_run

    metrics = evaluate_run(run_dir, split, trust_remote_code=trust_remote_code)
    click.echo(f"{split}: {_format_metrics(metrics)}")
    if errors is not None:
        from peftkit.error_analysis import worst_examples

        path, worst = worst_examples(
            run_dir, split, errors, errors_output, trust_remote_code=trust_remote_code
        )
        click.echo(f"wrote the {len(worst)} worst {split} examples to {path}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trials", required=True, type=int, help="Finished trials wanted (resuming counts old ones).")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Default: <run dir>-sweep.")
@click.option("--overwrite", is_flag=True, help="Start the sweep over (deletes the sweep folder).")
@user_errors
def sweep(recipe: Path, trials: int, overrides: tuple[str, ...], out: Path | None, overwrite: bool) -> None:
    """Hyper-parameter search over the recipe's [sweep.space] with Optuna; resumes an interrupted sweep."""
    from peftkit.recipe import find_recipe, load_recipe

    recipe = find_recipe(recipe)  # a shipped recipe's name, or a file
    load_recipe(recipe, overrides)  # validate, [sweep] included, before any heavy import
    _quiet_libraries()
    from peftkit.sweep import markdown_table, run_sweep

    result = run_sweep(recipe, trials, overrides=overrides, out_dir=out, overwrite=overwrite)
    if result.trials:
        columns = [c for c in result.trials[0] if c not in ("run_dir",)]
        click.echo("\n" + markdown_table(result.trials, columns))
    click.echo(f"Sweep folder: {result.sweep_dir} ({result.ran} run now, {len(result.trials)} finished)")
    if result.best is not None:
        click.echo(f"best: trial {result.best['trial']} {result.metric}={result.best[result.metric]:.4f}")
        click.echo(f"  peftkit finetune {result.sweep_dir / 'best_recipe.toml'}")


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--folds", default=5, show_default=True, help="Number of folds.")
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Default: <run dir>-cv.")
@click.option("--overwrite", is_flag=True, help="Train every fold again.")
@user_errors
def cv(recipe: Path, folds: int, overrides: tuple[str, ...], out: Path | None, overwrite: bool) -> None:
    """K-fold cross-validation over the training data: one run per fold, mean ± std of every metric."""
    from peftkit.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries(loaded)
    from peftkit.cv import CV_SUMMARY, run_cv

    result = run_cv(loaded, folds, out_dir=out, overwrite=overwrite)
    summary = result.summary["metrics"]
    kind = "stratified " if result.summary["stratified"] else ""
    click.echo(f"\n{folds}-fold {kind}cross-validation: {result.cv_dir}")
    shown = _format_metrics({k: v["mean"] for k, v in summary.items()}).split("  ")
    for item in shown:
        key = item.split("=")[0]
        if key in summary:
            click.echo(f"  {key:<36} {summary[key]['mean']:.4f} ± {summary[key]['std']:.4f}")
    click.echo(f"  (every metric: {result.cv_dir / CV_SUMMARY})")


FILE = click.Path(dir_okay=False, path_type=Path)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", help="Which split's metrics (default: test when every run has it, else validation).")
@click.option("--output", type=FILE, help="Also write a .csv, .md or .json file.")
@click.option("--plot", type=FILE, help="Bar plot PNG (default: beside --output).")
@user_errors
def compare(run_dirs: tuple[Path, ...], split: str | None, output: Path | None, plot: Path | None) -> None:
    """Metrics, trainable parameters, time and memory of runs side by side (sweep/cv folders expand)."""
    from peftkit.compare import compare_runs, format_table, plot_comparison, write_table

    comparison = compare_runs(run_dirs, split)
    scales = ", ".join(f"{task} {scale}" for task, scale in comparison.scales.items())
    header = f"{comparison.split} metrics" + (f" (scores: {scales})" if scales else "")
    click.echo(f"{header}\n" + format_table(comparison), nl=False)
    if output is not None:
        write_table(comparison, output)
        click.echo(f"wrote {output}")
    plot = plot or (output.with_suffix(".png") if output is not None else None)
    if plot is not None:
        click.echo(f"wrote {plot_comparison(comparison, plot)}")


@main.command()
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Records to predict: .jsonl, .json, .csv, .tsv, or .txt (one text a line); - reads stdin.",
)
@click.option(
    "--output",
    "output_path",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    help="Where to write one JSON result a line, in input order; - writes stdout.",
)
@click.option(
    "--input-format",
    type=click.Choice(["jsonl", "json", "csv", "tsv", "txt"]),
    help="Format of --input (default: from its extension; JSONL for stdin).",
)
@click.option(
    "--keep-columns",
    "keep_columns",
    multiple=True,
    metavar="FIELD[,FIELD...]",
    help="Input fields to copy into each result (after its id, which is always echoed). Repeatable.",
)
@click.option(
    "--columns",
    "columns",
    multiple=True,
    metavar="TASK_FIELD=INPUT_FIELD",
    help="Which input field is which task field, e.g. text=message (default: the recipe's [data] columns).",
)
@click.option(
    "--batch-size", type=click.IntRange(min=1), help="Records per forward pass (default: the task's)."
)
@click.option("--checkpoint", help="Predict with a checkpoint of the run: best, last or checkpoint-N.")
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
@user_errors
def predict(
    source: Path,
    input_path: Path,
    output_path: Path,
    input_format: str | None,
    keep_columns: tuple[str, ...],
    columns: tuple[str, ...],
    batch_size: int | None,
    checkpoint: str | None,
    trust_remote_code: bool,
) -> None:
    """Predict records with a run directory, one of its checkpoints, or a merged model folder.

    The n-th output line answers the n-th input record; a blank line of a JSONL or text input gets
    {"prediction": null, "skipped": "blank line"}. The input is checked before the model loads.
    """
    from peftkit import predicting

    resolved = predicting.resolve_source(source, checkpoint)
    predicting.check_output(output_path, input_path, resolved.run_dir or resolved.folder)
    stdin: bytes | None = None
    if predicting.is_stdio(input_path):
        stdin = sys.stdin.buffer.read()
    given = predicting.read_input(input_path, input_format, stdin=stdin)
    mapping = predicting.parse_columns(columns) if columns else None
    keep = predicting.parse_keep(keep_columns)
    rows = predicting.task_records(resolved, given, mapping)
    predicting.check_input(resolved, given, rows, keep, mapping)
    _quiet_libraries()
    from peftkit.runs import write_jsonl_atomic

    task, ctx, model = predicting.load_predictor(resolved, trust_remote_code=trust_remote_code)
    originals = [record for _, record in given.records]
    results = predicting.predict_records(task, ctx, model, rows, originals, keep, batch_size)
    to_stdout = predicting.is_stdio(output_path)
    if to_stdout:
        for result in results:
            click.echo(json.dumps(result, ensure_ascii=False))
    else:
        write_jsonl_atomic(output_path, results)
    blank = f" ({given.blank_lines} blank lines got an empty result)" if given.blank_lines else ""
    where = "stdout" if to_stdout else output_path
    click.echo(f"wrote {len(results)} predictions to {where}{blank}", err=to_stdout)


@main.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@user_errors
def push(folder: Path, repo_id: str, private: bool) -> None:
    """Upload a finished run directory, merged folder or bundle to a Hugging Face Hub model repository."""
    from peftkit.push import push_folder

    result = push_folder(folder, repo_id, private=private)
    click.echo(f"pushed {result['kind']} {folder} to {result['url']}")


DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the merged model.")
@click.option(
    "--dtype", type=DTYPE_CHOICE, help="Saved weights dtype (merging is float32). Default: [export]."
)
@click.option("--max-shard-size", help="Largest safetensors file, e.g. 2GB. Default: [export].")
@click.option("--checkpoint", help="Merge a checkpoint instead: best, last or checkpoint-N.")
@click.option("--samples", default=32, show_default=True, help="Validation examples the check compares.")
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    help="Absolute floor of the float32 |Δlogit| limit; the limit is max(this, 1e-5 × the largest |logit|).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing merge/export output.")
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
@user_errors
def merge(
    run_dir: Path,
    out: Path,
    dtype: str | None,
    max_shard_size: str | None,
    checkpoint: str | None,
    samples: int,
    tolerance: float,
    overwrite: bool,
    trust_remote_code: bool,
) -> None:
    """Merge a run's adapter into its base model; check the reloaded result against the adapter."""
    _quiet_libraries()
    from peftkit.merge import merge_run

    result = merge_run(
        run_dir,
        out,
        dtype=dtype,
        max_shard_size=max_shard_size,
        checkpoint=checkpoint,
        overwrite=overwrite,
        samples=samples,
        tolerance=tolerance,
        trust_remote_code=trust_remote_code,
    )
    report = result.report
    click.echo(f"\nMerged model: {result.out_dir} ({report['dtype']}, {', '.join(report['weight_files'])})")
    _echo_checks(report["verification"])
    click.echo(f"  {report['timing_s']['total_s']:.1f} s; peak RSS {report['peak_rss_mb']} MB")


def _echo_checks(verification: dict[str, Any]) -> None:
    sample = verification["sample"]
    click.echo(f"  sample: {sample['examples']} examples of the {sample['split'] or 'random'} split")
    for check in verification["checks"]:
        click.echo(
            f"  {check['name']:>8}: max |Δlogit| {check['max_abs_diff']:.3g}  "
            f"agreement {check['agreement']:.4f} ({check['predictions_compared']} predictions)  "
            f"{'passed' if check['passed'] else 'FAILED'}"
        )
    quantized = verification.get("quantized_adapter")
    if quantized and "max_abs_diff" in quantized:
        click.echo(
            f"  4-bit model as trained vs merged: max |Δlogit| {quantized['max_abs_diff']:.3g}  "
            f"agreement {quantized['agreement']:.4f}"
        )


@main.command("merge-adapters")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the new run.")
@click.option(
    "--method",
    type=click.Choice(["linear", "cat", "svd", "ties", "dare_linear", "dare_ties"]),
    default="linear",
    show_default=True,
    help="peft's combination of the LoRA matrices.",
)
@click.option("--weights", help="One weight per run, comma-separated (default: equal, summing to 1).")
@click.option("--density", type=float, help="ties/dare: fraction of entries kept, in (0, 1].")
@click.option("--svd-rank", type=int, help="svd: rank of the result (default: the largest rank).")
@click.option("--seed", default=0, show_default=True, help="Seed for DARE's random drop.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@user_errors
def merge_adapters(
    run_dirs: tuple[Path, ...],
    out: Path,
    method: str,
    weights: str | None,
    density: float | None,
    svd_rank: int | None,
    seed: int,
    overwrite: bool,
) -> None:
    """Combine the LoRA adapters of several runs (same base, task, labels) into a new run directory."""
    _quiet_libraries()
    from peftkit.combine import merge_adapters as combine
    from peftkit.errors import PeftkitError

    try:
        parsed = [float(w) for w in weights.split(",")] if weights else None
    except ValueError:
        raise PeftkitError(f"--weights {weights!r}: give numbers separated by commas, e.g. 0.7,0.3") from None
    result = combine(
        run_dirs,
        out,
        method=method,
        weights=parsed,
        density=density,
        svd_rank=svd_rank,
        overwrite=overwrite,
        seed=seed,
    )
    merge_info = result.meta["merge"]
    click.echo(f"\nCombined adapter run: {result.out_dir} (LoRA r={merge_info['rank']}, method {method})")
    click.echo(f"  weights {merge_info['weights']}; heads averaged: {bool(merge_info['heads'])}")
    click.echo(
        "  distance from the weighted sum of the runs' updates: "
        f"{merge_info['task_arithmetic_relative_error']:.3g} (relative)"
    )
    click.echo(f"  evaluate it: peftkit evaluate {result.out_dir}")


@main.command()
@click.argument("source", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the bundle.")
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["safetensors", "onnx", "gguf"]),
    help="safetensors, onnx and/or gguf (repeatable). Default: the recipe's [export] formats.",
)
@click.option(
    "--gguf-type",
    type=click.Choice(["f32", "f16", "q8_0"]),
    help="GGUF weights (Llama-architecture causal LMs, for llama.cpp). Default: [export] gguf_type.",
)
@click.option("--dtype", type=DTYPE_CHOICE, help="Weights dtype of the safetensors files. Default: [export].")
@click.option("--max-shard-size", help="Largest safetensors file, e.g. 2GB. Default: [export].")
@click.option("--samples", default=32, show_default=True, help="Examples the parity checks compare.")
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    help="Absolute floor of the float32 |Δlogit| limit; the limit is max(this, 1e-5 × the largest |logit|).",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing merge/export output.")
@click.option("--trust-remote-code", is_flag=True, help=TRUST_HELP)
@user_errors
def export(
    source: Path,
    out: Path,
    formats: tuple[str, ...],
    gguf_type: str | None,
    dtype: str | None,
    max_shard_size: str | None,
    samples: int,
    tolerance: float,
    overwrite: bool,
    trust_remote_code: bool,
) -> None:
    """Write a deployable bundle from a run directory (merged on the way) or a merged model folder."""
    _quiet_libraries()
    from peftkit.export import export_bundle

    result = export_bundle(
        source,
        out,
        formats=formats or None,
        dtype=dtype,
        max_shard_size=max_shard_size,
        overwrite=overwrite,
        samples=samples,
        tolerance=tolerance,
        trust_remote_code=trust_remote_code,
        gguf_type=gguf_type,
    )
    manifest = result.manifest
    size = sum(f["bytes"] for f in manifest["files"].values()) / 2**20
    click.echo(f"\nBundle: {result.out_dir} ({', '.join(manifest['formats'])}; {size:.1f} MiB)")
    if manifest.get("merge_verification"):
        _echo_checks(manifest["merge_verification"])
    onnx = manifest.get("onnx")
    if onnx:
        click.echo(
            f"      onnx: max |Δlogit| {onnx['max_abs_diff']:.3g}  agreement {onnx['agreement']:.4f} "
            f"({onnx['predictions_compared']} predictions, {onnx['sample']['split']} split)  passed"
        )
    gguf = manifest.get("gguf")
    if gguf:
        click.echo(
            f"      gguf: {gguf['file']} ({gguf['gguf_type']}): max |Δlogit| {gguf['max_abs_diff']:.3g}  "
            f"next-token agreement {gguf['agreement']:.4f} ({gguf['predictions_compared']} positions, "
            f"{gguf['sample']['split']} split; read back by transformers)  passed"
        )
    if manifest.get("pipeline_task"):
        click.echo(f'  pipeline("{manifest["pipeline_task"]}", model="{result.out_dir}")')


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="TABLE.KEY=VALUE", help=SET_HELP)
@click.option("--seq-len", type=int, default=None, help="Tokens per example (default: task.max_length).")
@click.option("--devices", type=int, default=None, help="Devices to shard over (default: CUDA ones, or 1).")
@click.option(
    "--device",
    "device",
    type=click.Choice(["cpu", "cuda"]),
    default=None,
    help="Activation model to use (default: cuda when a CUDA device is available, else cpu).",
)
@user_errors
def plan(
    recipe: Path, overrides: tuple[str, ...], seq_len: int | None, devices: int | None, device: str | None
) -> None:
    """Parameters and training memory of a recipe, without loading weights."""
    from peftkit.recipe import load_recipe

    loaded = load_recipe(recipe, overrides)
    _quiet_libraries(loaded)
    from peftkit.plan import format_bytes, plan_recipe

    result = plan_recipe(loaded, seq_len=seq_len, device=device)
    click.echo(f"{'module':<36} {'params':>14} {'trainable':>12}")
    for row in result.rows:
        click.echo(f"{row.name:<36} {row.total:>14,} {row.trainable:>12,}")
    share = 100 * result.trainable_params / max(result.total_params, 1)
    click.echo(f"{'total':<36} {result.total_params:>14,} {result.trainable_params:>12,} ({share:.2f}%)\n")
    optim = loaded.train.get("optim", "adamw_torch_fused")
    lines = [
        ("weights", result.weight_bytes),
        ("gradients", result.grad_bytes),
        (
            f"optimizer ({optim}, {100 * result.optimizer_8bit_fraction:.0f}% of state 8-bit)",
            result.optimizer_bytes,
        ),
        ("model state", result.model_state_bytes),
        (
            f"activations (batch {result.batch_size} x {result.seq_len} tokens"
            f"{', checkpointed' if result.gradient_checkpointing else ''}; estimate)",
            result.activation_bytes,
        ),
        ("total", result.total_bytes),
    ]
    cpu = result.activation_model is not None and result.activation_model.device == "cpu"
    if cpu:
        lines += [
            ("process baseline (measured: torch, transformers, data; no weights)", result.baseline_bytes),
            ("peak process RSS (total + baseline)", result.process_rss_bytes),
        ]
    for label, value in lines:
        click.echo(f"{label:<70} {format_bytes(value):>12}")
    click.echo(f"padding: {result.padding}")
    if not cpu:
        click.echo(
            f"host process baseline (measured, not on the device): {format_bytes(result.baseline_bytes)}"
        )
    for note in result.notes:
        click.echo(f"note: {note}")
    model = result.activation_model
    if model is not None:
        click.echo(f"activation model: {model.device.upper()} ({model.assumptions})")
        click.echo(model.calibration)
    _echo_zero_stages(result, devices)


def _echo_zero_stages(result: Any, devices: int | None) -> None:
    """Per-device memory under DDP and each ZeRO stage, and which one to pick (ds_configs/README.md)."""
    import torch

    from peftkit.plan import format_bytes, recommend_zero_stage, zero_stage_bytes

    cuda = torch.cuda.is_available()
    count = devices or (torch.cuda.device_count() if cuda else 1)
    device_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else None
    click.echo(f"\nper device over {count} device(s):")
    for stage, value in zero_stage_bytes(result, count).items():
        click.echo(f"  {stage:<68} {format_bytes(value):>12}")
    click.echo(f"advice: {recommend_zero_stage(result, count, device_bytes)}")


@main.command()
@click.option(
    "--check-lock",
    is_flag=True,
    help="Exit 1 if an installed version differs from requirements.lock (the stack the suite passed with).",
)
def env(check_lock: bool) -> None:
    """Versions of peftkit's stack, how they differ from the tested lock, and the devices torch sees."""
    from peftkit.lock import describe, lock_differences, locked_versions
    from peftkit.runs import package_versions

    for name, version in package_versions().items():
        click.echo(f"{name:<14} {version or '-'}")
    differences = lock_differences()
    if not locked_versions():
        click.echo("lock           none shipped with this installation")
    elif differences:
        count = f"{len(differences)} of {len(locked_versions())}"
        click.echo(f"lock           {count} packages differ from requirements.lock:")
        for line in describe(differences):
            click.echo(f"  {line}")
    else:
        click.echo(f"lock           all {len(locked_versions())} packages as in requirements.lock")
    if check_lock:
        if differences or not locked_versions():
            click.echo(
                "error: the installed stack is not the locked one (above). Fix: reinstall with "
                "`bash scripts/install.sh`, or test newer versions with `bash scripts/update_lock.sh`",
                err=True,
            )
            raise SystemExit(1)
        return
    import platform

    click.echo(f"{'python':<14} {platform.python_version()}")
    try:
        import torch
    except ImportError:
        click.echo("torch not installed")
        return
    cuda = torch.cuda.is_available()
    click.echo(f"{'cpu threads':<14} {torch.get_num_threads()}")
    click.echo(
        f"{'cuda':<14} {torch.version.cuda or '-'} ({torch.cuda.device_count() if cuda else 0} devices)"
    )
    for i in range(torch.cuda.device_count() if cuda else 0):
        click.echo(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
    click.echo(f"{'disk free':<14} {shutil.disk_usage('.').free / 2**30:.1f} GiB")


def _format_metrics(metrics: dict[str, Any]) -> str:
    """The headline numbers: loss, the task's scores, per-class F1; not throughput or supports."""
    skip = ("precision_", "recall_", "support_", "runtime", "_per_second")
    per_type = ("_precision", "_recall", "_f1", "_support", "_total")  # token_cls entity types, QA counts
    shown = [
        k
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not any(s in k for s in skip) and not k.endswith(per_type)
    ]
    return "  ".join(
        f"{k}={metrics[k]:.4f}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in shown
    )


if __name__ == "__main__":  # pragma: no cover
    main()
