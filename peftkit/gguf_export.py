"""GGUF files for llama.cpp (and Ollama) from a merged Llama-architecture causal LM, verified by reading back.

The file holds the merged weights in f32, f16 or q8_0, the llama hyper-parameters, the byte-level BPE
tokenizer (``tokenizer.ggml.model = "gpt2"``: tokens, token types, merges, special token ids) and the chat
template. It follows llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``): tensor names from gguf-py's
tensor map, the Q and K projections permuted for llama.cpp's rotary layout (``LlamaModel.permute``), no
``output.weight`` when the embeddings are tied, 1-D tensors kept in f32, a q8_0 row that is not a whole
number of 32-value blocks written in f16.

Verification (:func:`write_verified_gguf`) loads the file back with transformers' own GGUF reader
(``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``, which reverses the permutation) from a
folder holding nothing else, and compares its logits with the merged model's on the run's validation examples;
the tokenizer transformers rebuilds from the file must encode those texts to the same ids as the run's.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from peftkit.console import follow_transformers_progress_switch
from peftkit.errors import ExportError

logger = logging.getLogger(__name__)

GGUF_TYPES = ("f32", "f16", "q8_0")
# f16 and q8_0 round every weight: below this share of equal next-token argmaxes the file is refused
GGUF_MIN_AGREEMENT = 0.99
# written and checked here; others (Qwen2's q/k/v biases, Mistral's sliding window, Gemma's norm offsets and
# embedding scale) need their own conversion, untested in peftkit
SUPPORTED_MODEL_TYPES = ("llama",)
INSTALL_HINT = "pip install gguf (gguf-py, llama.cpp's writer)"
# a text with what pre-tokenizers treat differently: digits, contractions, runs of spaces, newlines, accents
TOKENIZER_PROBE = "It's 2026: 12345 apples,  cost $3.50\n\tdon't  Ñandú café ¿qué?  <|im_end|> 😀"
# pre-tokenizer name llama.cpp knows -> the tokenizer.json pre_tokenizer that splits text the same way
_PRE_TOKENIZERS = {
    "gpt-2": [{"type": "ByteLevel", "use_regex": True}],
    "smollm": [{"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}],
}


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type.upper()}.gguf"


# --------------------------------------------------------------------------------------------------
# What can be written: checked before any weights are loaded


def check_gguf_possible(task_name: str, model_config: Any, tokenizer_folder: Path, source: Path) -> None:
    """Refuse, with the reason, a run whose model or tokenizer this writer cannot put in a GGUF file."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ExportError(f"--format gguf needs the gguf package: {INSTALL_HINT}")
    problem = gguf_model_problem(task_name, model_config)
    if problem is not None:
        raise ExportError(f"{source}: {problem}")
    tokenizer_kind(tokenizer_folder, source)


def gguf_model_problem(task_name: str, model_config: Any) -> str | None:
    """Why this writer cannot put a ``task_name`` run on this base model in a GGUF file (None: it can); from
    the config alone, so ``peftkit validate`` says it for ``[export] formats = ["gguf"]``."""
    model_type = str(getattr(model_config, "model_type", "?"))
    if task_name != "seq2seq" or getattr(model_config, "is_encoder_decoder", False):
        kind = "an encoder-decoder model" if task_name == "seq2seq" else f"a {task_name} model ({model_type})"
        return (
            f"GGUF export writes decoder-only language models (llama.cpp runs text generation), "
            f"and this run is {kind}; export it with --format safetensors"
            + (" or --format onnx" if task_name != "seq2seq" else "")
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (
            f"GGUF export writes Llama-architecture models (model_type 'llama': SmolLM2, "
            f"Llama 2/3, TinyLlama); this run's base is {model_type!r}, whose GGUF layout peftkit does not "
            "write (Qwen2, Mistral, Gemma, Phi and others are untested). Export --format safetensors and "
            "convert it with llama.cpp's convert_hf_to_gguf.py"
        )
    unsupported = [name for name in ("attention_bias", "mlp_bias") if getattr(model_config, name, False)]
    rope = dict(getattr(model_config, "rope_parameters", None) or {})
    if rope.get("rope_type", "default") != "default":
        unsupported.append(f"rope_type {rope['rope_type']!r}")
    if unsupported:
        return (
            f"this Llama model has {', '.join(unsupported)}, which peftkit's GGUF writer does not "
            "carry (transformers' GGUF reader would not restore them either); export --format safetensors"
        )
    return None


def tokenizer_kind(folder: Path, source: Path) -> str:
    """The llama.cpp pre-tokenizer name of the byte-level BPE tokenizer in ``folder``; refuses any other."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ExportError(
            f"{source}: no tokenizer.json in {folder}; --format gguf writes fast byte-level BPE tokenizers"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    steps = _pre_tokenizer_steps(data.get("pre_tokenizer"))
    if model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in steps):
        kind = model.get("type") or "unknown"
        raise ExportError(
            f"{source}: --format gguf writes byte-level BPE tokenizers (GGUF tokenizer.ggml.model 'gpt2': "
            f"SmolLM2, Llama 3, GPT-2); this run's tokenizer is {kind}"
            + ("" if kind != "BPE" else " without a ByteLevel pre-tokenizer (sentencepiece-style)")
            + ". Export --format safetensors"
        )
    for name, pattern in _PRE_TOKENIZERS.items():
        if len(steps) == len(pattern) and all(
            all(step.get(key) == value for key, value in want.items())
            for step, want in zip(steps, pattern, strict=True)
        ):
            return name
    raise ExportError(
        f"{source}: the tokenizer's pre-tokenizer {json.dumps(data.get('pre_tokenizer'))[:200]} is not one "
        f"peftkit can name for llama.cpp (known: {', '.join(_PRE_TOKENIZERS)}); export --format safetensors "
        "and convert with llama.cpp's convert_hf_to_gguf.py, which knows more"
    )


def _pre_tokenizer_steps(pre: Any) -> list[dict[str, Any]]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [step for step in pre.get("pretokenizers") or [] if isinstance(step, dict)]
    return [pre]


# --------------------------------------------------------------------------------------------------
# Writing


def llama_permute(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """llama.cpp's ``LlamaModel.permute``: each head's rotary halves interleaved, as its RoPE expects."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def add_llama_hparams(writer: Any, config: Any) -> None:
    """The ``llama.*`` keys transformers' and llama.cpp's readers build the model config from."""
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def llama_tensors(
    state_dict: Mapping[str, Any], config: Any, gguf_type: str
) -> Iterator[tuple[str, Any, Any]]:
    """(GGUF name, numpy array, raw ggml type or None) for each weight of a LlamaForCausalLM state dict."""
    import gguf
    import numpy as np

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    q8_0 = gguf.GGMLQuantizationType.Q8_0
    tied = bool(getattr(config, "tie_word_embeddings", False))
    n_head, n_kv = (
        int(config.num_attention_heads),
        int(config.num_key_value_heads or config.num_attention_heads),
    )
    for hf_name, tensor in state_dict.items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads the embeddings as the output layer when output.weight is absent
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for the tensor {hf_name}: not a plain Llama model")
        data = tensor.detach().float().cpu().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = llama_permute(data, n_head, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_permute(data, n_head, n_kv)
        data = np.ascontiguousarray(data, dtype=np.float32)
        if data.ndim < 2 or gguf_type == "f32":
            yield name, data, None
        elif gguf_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[q8_0][0] == 0:
            yield name, gguf.quantize(data, q8_0), q8_0
        else:  # f16, and q8_0 rows that are not whole blocks (as llama.cpp's converter falls back)
            yield name, data.astype(np.float16), None


def tokenizer_metadata(tokenizer: Any, tokenizer_json: Path, vocab_size: int) -> dict[str, Any]:
    """Tokens (padded to the model's vocabulary with unused ``[PAD<i>]`` entries), token types, merges,
    special ids and whether BOS/EOS are added, from a fast byte-level BPE tokenizer."""
    import gguf

    data = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise ExportError(
            f"the tokenizer has {len(vocab)} tokens but the model's embeddings only {vocab_size}; "
            "a GGUF file cannot hold tokens without embeddings"
        )
    by_id = {index: token for token, index in vocab.items()}
    added = {int(entry["id"]): bool(entry.get("special")) for entry in data.get("added_tokens") or []}
    types = gguf.TokenType
    tokens, token_types = [], []
    for index in range(vocab_size):
        token = by_id.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            token_types.append(types.UNUSED)
        else:
            tokens.append(token)
            kind = (
                types.NORMAL if index not in added else types.CONTROL if added[index] else types.USER_DEFINED
            )
            token_types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in (data.get("model") or {}).get("merges") or []]
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    ids = {
        name: tokenizer.convert_tokens_to_ids(token) if token is not None else None
        for name, token in (
            ("bos", tokenizer.bos_token),
            ("eos", tokenizer.eos_token),
            ("unk", tokenizer.unk_token),
            ("pad", tokenizer.pad_token),
        )
    }
    return {
        "tokens": tokens,
        "token_types": token_types,
        "merges": merges,
        "ids": ids,
        "add_bos": bool(ids["bos"] is not None and probe[:1] == [ids["bos"]] and plain[:1] != probe[:1]),
        "add_eos": bool(ids["eos"] is not None and probe[-1:] == [ids["eos"]] and plain[-1:] != probe[-1:]),
        "chat_template": tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None,
    }


def write_gguf(
    path: Path, model: Any, tokenizer: Any, tokenizer_json: Path, gguf_type: str, *, name: str, pre: str
) -> None:
    """Write ``model`` (a float LlamaForCausalLM) and its tokenizer as a GGUF file at ``path``."""
    import gguf

    config = model.config
    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        add_llama_hparams(writer, config)
        writer.add_file_type(file_types[gguf_type])
        if gguf_type == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        meta = tokenizer_metadata(tokenizer, tokenizer_json, int(config.vocab_size))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(meta["tokens"])
        writer.add_token_types(meta["token_types"])
        writer.add_token_merges(meta["merges"])
        for key, add in (
            ("bos", writer.add_bos_token_id),
            ("eos", writer.add_eos_token_id),
            ("unk", writer.add_unk_token_id),
            ("pad", writer.add_pad_token_id),
        ):
            if meta["ids"][key] is not None:
                add(int(meta["ids"][key]))
        writer.add_add_bos_token(meta["add_bos"])
        writer.add_add_eos_token(meta["add_eos"])
        if meta["chat_template"]:
            writer.add_chat_template(meta["chat_template"])
        for tensor_name, data, raw_dtype in llama_tensors(model.state_dict(), config, gguf_type):
            writer.add_tensor(tensor_name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# --------------------------------------------------------------------------------------------------
# Writing and verifying, for export


def write_verified_gguf(
    stage: Path, recipe: Any, report: Mapping[str, Any], gguf_type: str, samples: int, tolerance: float
) -> dict[str, Any]:
    """The merged model in ``stage`` as ``model-<TYPE>.gguf`` there, verified; returns the check record.

    Raises :class:`ExportError` (the caller discards the stage) when transformers' reading of the file
    disagrees with the merged model: f32 beyond the merge tolerance or any next-token argmax different; f16
    and q8_0 below :data:`GGUF_MIN_AGREEMENT` argmax agreement; or a tokenizer that encodes differently.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from peftkit.modeling import load_stack
    from peftkit.parity import DEFAULT_SAMPLES, compare_outputs, torch_outputs, verification_sample

    if gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type {gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    started = time.perf_counter()
    config = AutoConfig.from_pretrained(str(stage))
    stack = load_stack(
        recipe, report.get("labels"), tokenizer_source=stage, model_config=config, with_model=False
    )
    task, ctx = stack.task, stack.ctx
    model = AutoModelForCausalLM.from_pretrained(str(stage), dtype=torch.float32).eval()
    sample = verification_sample(recipe, task, ctx, model, samples or DEFAULT_SAMPLES)
    reference = torch_outputs(model, sample)
    pre = tokenizer_kind(stage, stage)
    name = str(report.get("run_name") or Path(str(report.get("source_run", "model"))).name)
    file_name = gguf_file_name(gguf_type)
    # written alone in a folder of its own, so that reading it back can use nothing but the file
    alone = stage / ".gguf-check"
    alone.mkdir()
    path = alone / file_name
    write_gguf(path, model, ctx.tokenizer, stage / "tokenizer.json", gguf_type, name=name, pre=pre)
    del model
    gc.collect()
    write_s = time.perf_counter() - started

    mark = time.perf_counter()
    follow_transformers_progress_switch()
    reloaded = AutoModelForCausalLM.from_pretrained(str(alone), gguf_file=file_name, dtype=torch.float32)
    candidate = torch_outputs(reloaded, sample)
    del reloaded
    gc.collect()
    exact = gguf_type == "f32"
    check = compare_outputs(
        reference,
        candidate,
        name="gguf",
        description=f"{gguf_type} GGUF file read back by transformers' GGUF loader (float32) vs the merged "
        "model" + ("" if exact else "; differences come from rounding the weights"),
        tolerance=tolerance if exact else None,
        min_agreement=1.0 if exact else GGUF_MIN_AGREEMENT,
    )
    tokenizer_check = _compare_tokenizers(
        ctx.tokenizer, AutoTokenizer.from_pretrained(str(alone), gguf_file=file_name), sample
    )
    shutil.move(str(path), str(stage / file_name))
    alone.rmdir()
    check.update(
        file=file_name,
        gguf_type=gguf_type,
        tensor_types=_tensor_types(stage / file_name),
        tokenizer=tokenizer_check,
        sample=sample.description,
        write_s=round(write_s, 2),
        verify_s=round(time.perf_counter() - mark, 2),
        bytes=(stage / file_name).stat().st_size,
    )
    if not check["passed"] or not tokenizer_check["passed"]:
        raise ExportError(_failure_message(check, tokenizer_check, sample.description))
    logger.info(
        "GGUF %s parity: max |Δlogit| %.3g, next-token agreement %.4f",
        gguf_type,
        check["max_abs_diff"],
        check["agreement"],
    )
    return check


def _compare_tokenizers(run_tokenizer: Any, from_file: Any, sample: Any) -> dict[str, Any]:
    """Does the tokenizer rebuilt from the file encode the verification texts (and a probe) to the same ids,
    with the same special tokens and chat template?"""
    texts = [TOKENIZER_PROBE]
    for batch in sample.batches:
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            texts.append(run_tokenizer.decode(row[mask.bool()].tolist(), skip_special_tokens=False))
    different = [
        text
        for text in texts
        if run_tokenizer(text, add_special_tokens=True)["input_ids"]
        != from_file(text, add_special_tokens=True)["input_ids"]
    ]
    specials = {
        name: (getattr(run_tokenizer, name), getattr(from_file, name))
        for name in ("bos_token", "eos_token", "pad_token")
    }
    special_mismatch = {k: v for k, v in specials.items() if v[0] is not None and v[0] != v[1]}
    template_equal = (run_tokenizer.chat_template or None) == (from_file.chat_template or None)
    return {
        "texts_compared": len(texts),
        "texts_different": len(different),
        "first_different": different[0][:200] if different else None,
        "special_tokens_different": {k: list(v) for k, v in special_mismatch.items()},
        "chat_template_equal": template_equal,
        "passed": not different and not special_mismatch and template_equal,
    }


def _tensor_types(path: Path) -> dict[str, int]:
    from collections import Counter

    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return dict(sorted(Counter(tensor.tensor_type.name for tensor in reader.tensors).items()))


def _failure_message(
    check: Mapping[str, Any], tokenizer: Mapping[str, Any], sample: Mapping[str, Any]
) -> str:
    where = f"{sample.get('examples')} examples of the {sample.get('split') or 'random'} split"
    lines = [f"the {check['gguf_type']} GGUF file does not reproduce the merged model; nothing was written:"]
    if not check["passed"]:
        limit = f" (limit {check['limit']:g})" if check.get("tolerance") is not None else ""
        lines.append(
            f"  logits: max |Δlogit| {check['max_abs_diff']:.3g}{limit}, next-token agreement "
            f"{check['agreement']:.4f} (needs {check['min_agreement']:.2f}) over "
            f"{check['predictions_compared']} positions of {where}"
        )
        if check["gguf_type"] != "f32":
            lines.append("  the rounding changes the model's choices: export --gguf-type f32 (or f16)")
    if not tokenizer["passed"]:
        lines.append(
            f"  tokenizer: {tokenizer['texts_different']} of {tokenizer['texts_compared']} texts encode "
            f"differently (first: {tokenizer['first_different']!r}); special tokens differing: "
            f"{tokenizer['special_tokens_different'] or 'none'}; chat template equal: "
            f"{tokenizer['chat_template_equal']}"
        )
    return "\n".join(lines)
