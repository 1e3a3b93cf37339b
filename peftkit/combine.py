"""``peftkit merge-adapters``: combine the LoRA adapters of several runs into one new run directory.

The runs must share the base model, task and labels. peft's ``add_weighted_adapter`` refuses adapters that
carry ``modules_to_save`` (the task heads), so peftkit loads the LoRA matrices without them, combines those
with peft, and merges the heads itself: a weighted mean with the given weights normalised to sum to 1. The
result is a run directory (``PeftModel.from_pretrained`` and ``peftkit predict`` load it).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit import runs
from peftkit.adapters import residual_init
from peftkit.merge import MergeError
from peftkit.outputs import check_output_dir, staged_output

logger = logging.getLogger(__name__)

COMBINATIONS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
EQUAL_RANK_COMBINATIONS = ("linear", "ties", "dare_linear", "dare_ties")
DENSITY_COMBINATIONS = ("ties", "dare_linear", "dare_ties")


@dataclass
class CombineResult:
    out_dir: Path
    meta: dict[str, Any]


@dataclass
class _Source:
    run_dir: Path
    meta: dict[str, Any]
    recipe: Any
    labels: list[str] | None
    adapter_config: dict[str, Any]
    state: dict[str, Any]  # adapter_model.safetensors tensors


def combine_weights(count: int, weights: Sequence[float] | None) -> list[float]:
    """The per-run weights: as given (one per run, finite, not all zero), default 1/count each (a mean)."""
    if weights is None or len(weights) == 0:
        return [1.0 / count] * count
    if len(weights) != count:
        raise MergeError(f"--weights has {len(weights)} values for {count} runs; give one weight per run")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights {list(weights)}: every weight must be a finite number")
    if all(w == 0 for w in weights):
        raise MergeError("--weights are all zero; the merged adapter would do nothing")
    return [float(w) for w in weights]


def check_density(method: str, density: float | None) -> float | None:
    if method in DENSITY_COMBINATIONS:
        if density is None:
            raise MergeError(
                f"--method {method} needs --density: the fraction of each adapter's entries kept "
                "(e.g. 0.5; TIES and DARE prune the rest)"
            )
        if not 0 < density <= 1:
            raise MergeError(f"--density {density}: must be in (0, 1]")
        return density
    if density is not None:
        raise MergeError(
            f"--density applies to {', '.join(DENSITY_COMBINATIONS)} only, not --method {method}"
        )
    return None


def head_weights(weights: Sequence[float]) -> list[float]:
    """Weights for averaging the task heads: the run weights normalised to sum to 1."""
    total = sum(weights)
    if total <= 0:
        raise MergeError(
            f"--weights {list(weights)} sum to {total:g}; the task heads are averaged with the weights "
            "normalised to sum to 1, which needs a positive sum"
        )
    return [w / total for w in weights]


def is_lora_key(key: str) -> bool:
    return ".lora_" in key


def _load_source(run_dir: Path) -> _Source:
    from safetensors.torch import load_file

    meta = runs.check_complete(run_dir)
    recipe = runs.load_resolved_recipe(run_dir)
    labels = runs.run_labels(run_dir, recipe, meta)
    adapter_config = runs.read_json(run_dir / runs.ADAPTER_CONFIG)
    state = load_file(str(run_dir / runs.ADAPTER_WEIGHTS))
    return _Source(run_dir, meta, recipe, list(labels) if labels is not None else None, adapter_config, state)


def check_compatible(sources: Sequence[_Source], method: str) -> None:
    """Same task, labels, base model and LoRA kind for every run; anything else is a clear MergeError."""
    first = sources[0]
    for other in sources[1:]:
        pair = f"{first.run_dir} and {other.run_dir}"
        if other.recipe.task_name != first.recipe.task_name:
            raise MergeError(
                f"{pair}: different tasks ({first.recipe.task_name} vs {other.recipe.task_name}); "
                "only adapters of the same task can be combined"
            )
        if other.labels != first.labels:
            raise MergeError(
                f"{pair}: different labels ({first.labels} vs {other.labels}); the heads would mean "
                "different things. Train them with the same [task] label_list"
            )
        for key in ("name_or_path", "decoder_name_or_path", "gguf_file", "revision"):
            a, b = getattr(first.recipe.model, key), getattr(other.recipe.model, key)
            if a != b:
                raise MergeError(
                    f"{pair}: different base models (model.{key} {a!r} vs {b!r}); adapters only combine on "
                    "the base they were trained on"
                )
        if other.adapter_config.get("task_type") != first.adapter_config.get("task_type"):
            raise MergeError(f"{pair}: different peft task types; they cannot be combined")
        if other.recipe.task != first.recipe.task:
            logger.warning(
                "%s: [task] settings differ; the combined run keeps those of %s", pair, first.run_dir
            )
    for source in sources:
        config = source.adapter_config
        where = source.run_dir / runs.ADAPTER_CONFIG
        if config.get("peft_type") != "LORA":
            raise MergeError(
                f"{where}: a {config.get('peft_type')} adapter; only LoRA adapters can be combined"
            )
        if config.get("use_dora"):
            raise MergeError(f"{where}: a DoRA adapter; peft's add_weighted_adapter cannot combine DoRA")
        if config.get("bias", "none") != "none":
            raise MergeError(f"{where}: trains biases (bias = {config['bias']!r}); these cannot be combined")
        if config.get("target_parameters"):
            raise MergeError(f"{where}: targets parameters directly; these cannot be combined")
        residual = residual_init(config)
        if residual is not None:
            # its A·B is an update of the residual base W - B0·A0 (the init moved B0·A0 out of the base
            # weights), not of the base the other adapters share; the combined adapter would lose -B0·A0
            raise MergeError(
                f"{where}: a LoRA adapter initialised with init_lora_weights = {residual!r}, which trains "
                "on a residual base (the init moves part of each weight into the adapter), so its matrices "
                "are no update of the shared base model and cannot be combined with others; train the runs "
                "with the default init (init_lora_weights = true) to combine them, or merge each run on its "
                "own with `peftkit merge`"
            )
    kinds = {type(s.adapter_config.get("target_modules")).__name__ for s in sources}
    if len(kinds) > 1:
        raise MergeError(
            "the runs name target_modules differently (a list in some, a pattern string such as "
            "'all-linear' in others); peft cannot combine those. Train them with the same target_modules"
        )
    ranks = [s.adapter_config.get("r") for s in sources]
    patterned = [s.run_dir for s in sources if s.adapter_config.get("rank_pattern")]
    if method in EQUAL_RANK_COMBINATIONS and len(set(ranks)) > 1 and patterned:
        raise MergeError(
            f"--method {method} needs equal ranks, and {patterned[0]} sets a rank_pattern that cannot be "
            "padded; use --method cat or svd, which accept any ranks"
        )


def merge_adapters(
    sources: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    method: str = "linear",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    svd_rank: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
) -> CombineResult:
    """Combine the LoRA adapters of several runs into one new run directory at ``out``.

    LoRA matrices are combined by peft's ``add_weighted_adapter`` with ``method``; methods that need equal
    ranks get the smaller adapters zero-padded to the largest rank first (a padded adapter computes exactly
    the same update). Task heads (``modules_to_save``) are averaged with the weights normalised to sum to 1.
    The metadata records how far the combined update is from the weighted sum of the runs' updates.
    """
    if method not in COMBINATIONS:
        raise MergeError(f"--method {method}: use one of {', '.join(COMBINATIONS)}")
    if len(sources) < 2:
        raise MergeError("merge-adapters needs at least two run directories")
    run_dirs = [Path(s) for s in sources]
    if len({d.resolve() for d in run_dirs}) != len(run_dirs):
        raise MergeError("the same run directory is named twice; name each run once (use --weights to weigh)")
    weights = combine_weights(len(run_dirs), weights)
    density = check_density(method, density)
    out_dir = Path(out)
    check_output_dir(out_dir, overwrite, markers=runs.OUTPUT_MARKERS, inputs=run_dirs)
    loaded = [_load_source(d) for d in run_dirs]
    check_compatible(loaded, method)
    head_mix = head_weights(weights) if any(_head_keys(s.state) for s in loaded) else None
    with staged_output(out_dir, overwrite, markers=runs.OUTPUT_MARKERS) as stage:
        meta = _write_combined(loaded, stage, out_dir, method, weights, density, svd_rank, head_mix, seed)
    return CombineResult(out_dir=out_dir, meta=meta)


def _head_keys(state: Mapping[str, Any]) -> list[str]:
    return [key for key in state if not is_lora_key(key)]


def _write_combined(
    sources: list[_Source],
    stage: Path,
    out_dir: Path,
    method: str,
    weights: list[float],
    density: float | None,
    svd_rank: int | None,
    head_mix: list[float] | None,
    seed: int,
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from peftkit.modeling import load_stack

    started = time.perf_counter()
    first = sources[0]
    stack = load_stack(first.recipe, first.labels, tokenizer_source=first.run_dir, dtype="float32")
    task, base = stack.task, stack.model

    # LoRA matrices only: with modules_to_save, add_weighted_adapter refuses (the heads are merged below).
    names = [f"run{i}" for i in range(len(sources))]
    configs = [_lora_only_config(LoraConfig, s.adapter_config) for s in sources]
    model = get_peft_model(base, configs[0], adapter_name=names[0])
    for name, config in zip(names[1:], configs[1:], strict=True):
        model.add_adapter(name, config)
    for name, source in zip(names, sources, strict=True):
        lora_state = {k: v.float() for k, v in source.state.items() if is_lora_key(k)}
        result = set_peft_model_state_dict(model, lora_state, adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if is_lora_key(k)]
        if unexpected:
            raise MergeError(
                f"{source.run_dir / runs.ADAPTER_WEIGHTS}: {len(unexpected)} LoRA tensors do not fit "
                f"the base model (e.g. {unexpected[0]}); was it trained on another base?"
            )
    ranks = [int(s.adapter_config["r"]) for s in sources]
    padded = _harmonise_ranks(model, names, ranks) if method in EQUAL_RANK_COMBINATIONS else []

    torch.manual_seed(seed)  # DARE drops entries at random
    model.add_weighted_adapter(
        names,
        list(weights),
        "combined",
        combination_type=method,
        density=density,
        svd_rank=svd_rank if method == "svd" else None,
    )
    # peft gives the new adapter lora_alpha = r, i.e. scaling 1 (sqrt(r) under rslora): the combined matrices
    # already include each run's scaling, so the saved adapter uses plain scaling 1.
    _set_scaling(model, "combined", 1.0)
    fidelity = _task_arithmetic_error(model, names, weights, "combined")

    combined_config = model.peft_config["combined"]
    state = get_peft_model_state_dict(model, adapter_name="combined")
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    heads = _average_heads(sources, head_mix) if head_mix is not None else {}
    state.update(heads)
    modules_to_save = sorted({m for s in sources for m in (s.adapter_config.get("modules_to_save") or [])})
    out_config = dataclasses.replace(
        combined_config,
        lora_alpha=combined_config.r,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        modules_to_save=modules_to_save or None,
        task_type=first.adapter_config.get("task_type"),
        # the portable reference, seen from the combined adapter's own folder
        base_model_name_or_path=runs.adapter_base_reference(runs.base_model_record(first.recipe, out_dir)),
        inference_mode=True,
    )
    out_config.save_pretrained(str(stage))
    save_file(state, str(stage / runs.ADAPTER_WEIGHTS), metadata={"format": "pt"})
    stack.ctx.tokenizer.save_pretrained(str(stage))
    shutil.copy2(first.run_dir / runs.MODEL_CONFIG, stage / runs.MODEL_CONFIG)
    merge = {
        "method": method,
        "weights": list(weights),
        "density": density,
        "rank": int(out_config.r),
        "zero_padded_to_rank": max(ranks) if padded else None,
        "padded_runs": [str(sources[i].run_dir.resolve()) for i in padded],
        "heads": (
            {"modules": sorted({k.rsplit(".", 1)[0] for k in heads}), "weights": head_mix} if heads else None
        ),
        "head_rule": "weighted mean of the runs' modules_to_save tensors (--weights normalised to 1)",
        "task_arithmetic_relative_error": fidelity,
    }
    merged_from = [
        {
            "run": str(s.run_dir.resolve()),
            "weight": w,
            "r": s.adapter_config.get("r"),
            "lora_alpha": s.adapter_config.get("lora_alpha"),
            "use_rslora": s.adapter_config.get("use_rslora", False),
        }
        for s, w in zip(sources, weights, strict=True)
    ]
    return runs.write_combined_records(
        stage,
        out_dir,
        first.recipe,
        stack.ctx.labels,
        task.name,
        out_config,
        seed=seed,
        merge=merge,
        merged_from=merged_from,
        wall_time_s=time.perf_counter() - started,
    )


def _lora_only_config(config_class: Any, adapter_config: Mapping[str, Any]) -> Any:
    """The run's LoraConfig without heads or task type (so peft adds no ModulesToSaveWrapper)."""
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    fields = {k: v for k, v in adapter_config.items() if k in known}
    fields.update(modules_to_save=None, task_type=None, inference_mode=True)
    return config_class(**fields)


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [module for module in model.modules() if isinstance(module, LoraLayer)]


def _harmonise_ranks(model: Any, names: list[str], ranks: list[int]) -> list[int]:
    """Zero-pad smaller adapters to the largest rank (A gets zero rows, B zero columns; B·A is unchanged).

    Returns the indices of the padded adapters. The layer keeps each adapter's own scaling.
    """
    import torch

    target = max(ranks)
    padded = [i for i, r in enumerate(ranks) if r < target]
    if not padded:
        return []
    for layer in _lora_layers(model):
        for i in padded:
            name = names[i]
            if name in getattr(layer, "lora_embedding_A", {}):
                raise MergeError(
                    "ranks differ and an adapter targets an embedding layer, which peftkit cannot pad; "
                    "use --method cat or svd"
                )
            if name not in layer.lora_A:
                continue
            a, b = layer.lora_A[name], layer.lora_B[name]
            if not isinstance(a, torch.nn.Linear) or not isinstance(b, torch.nn.Linear):
                raise MergeError(
                    f"ranks differ and {type(a).__name__} LoRA layers cannot be padded; "
                    "use --method cat or svd"
                )
            grow = target - a.out_features
            new_a = torch.nn.Linear(a.in_features, target, bias=False, dtype=a.weight.dtype)
            new_b = torch.nn.Linear(target, b.out_features, bias=b.bias is not None, dtype=b.weight.dtype)
            with torch.no_grad():
                new_a.weight.copy_(torch.cat([a.weight, a.weight.new_zeros(grow, a.in_features)], dim=0))
                new_b.weight.copy_(torch.cat([b.weight, b.weight.new_zeros(b.out_features, grow)], dim=1))
                if b.bias is not None:
                    new_b.bias.copy_(b.bias)
            layer.lora_A[name], layer.lora_B[name] = new_a, new_b
            layer.r[name] = target
    for i in padded:
        model.peft_config[names[i]].r = target
    logger.info(
        "ranks %s differ: zero-padded %d adapter(s) to rank %d (their updates are unchanged)",
        ranks,
        len(padded),
        target,
    )
    return padded


def _set_scaling(model: Any, name: str, value: float) -> None:
    for layer in _lora_layers(model):
        if name in layer.scaling:
            layer.scaling[name] = value


def _task_arithmetic_error(model: Any, names: list[str], weights: list[float], combined: str) -> float:
    """‖ΔW_combined − Σ wᵢ ΔWᵢ‖ / ‖Σ wᵢ ΔWᵢ‖ over the LoRA layers: 0 for cat (exact), more otherwise."""
    import torch

    error = reference = 0.0
    with torch.no_grad():
        for layer in _lora_layers(model):
            if combined not in layer.lora_A:
                continue
            target = None
            for name, weight in zip(names, weights, strict=True):
                if name in layer.lora_A:
                    delta = layer.get_delta_weight(name).float() * weight
                    target = delta if target is None else target + delta
            if target is None:
                continue
            got = layer.get_delta_weight(combined).float()
            error += float((got - target).pow(2).sum())
            reference += float(target.pow(2).sum())
    return math.sqrt(error / reference) if reference > 0 else 0.0


def _average_heads(sources: list[_Source], mix: list[float]) -> dict[str, Any]:
    """The weighted mean of every non-LoRA tensor (the modules_to_save heads) across the runs."""
    keys = _head_keys(sources[0].state)
    for source in sources[1:]:
        if sorted(_head_keys(source.state)) != sorted(keys):
            raise MergeError(
                f"{sources[0].run_dir} and {source.run_dir} save different head tensors "
                f"({sorted(keys)} vs {sorted(_head_keys(source.state))}); they cannot be averaged"
            )
    averaged = {}
    for key in keys:
        shapes = {tuple(s.state[key].shape) for s in sources}
        if len(shapes) > 1:
            raise MergeError(f"head tensor {key} has different shapes across runs ({sorted(shapes)})")
        total = sum(s.state[key].float() * w for s, w in zip(sources, mix, strict=True))
        averaged[key] = total.contiguous()
    return averaged
