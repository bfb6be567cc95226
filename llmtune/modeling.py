"""Model and tokenizer: from a hub id, a local directory, or built from scratch from a config."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from llmtune.atomic import atomic_dir, cache_root
from llmtune.errors import UserError
from llmtune.recipe import ModelSpec, TokenizerSpec


def _load_error(what: str, name: str, exc: Exception) -> UserError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if Path(name).exists():
        return UserError(f"{what}: cannot load {name!r}: {first}")
    return UserError(
        f"{what}: {name!r} is not a local directory and could not be loaded from the hub ({first}); "
        "check the name, or HF_HUB_OFFLINE / your connection"
    )


def load_pretrained_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """`AutoTokenizer.from_pretrained`, with a pad token (GPT-2 has none: EOS doubles as PAD)."""
    from transformers import AutoTokenizer

    if Path(name).is_dir() and not any(
        (Path(name) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "spiece.model")
    ):
        raise UserError(f"tokenizer: {name!r} has no tokenizer files; set tokenizer.pretrained or tokenizer.train")
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error("tokenizer.pretrained", name, exc) from None
    return ensure_pad_token(tok)


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its EOS as PAD (the GPT-2 convention)."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tokenizer(
    spec: TokenizerSpec,
    model: ModelSpec,
    texts: Callable[[], Iterable[str]],
    data_fingerprint: str,
    cache_dir: str | None,
) -> tuple[Any, str]:
    """The recipe's tokenizer and a one-line account of where it came from.

    A trained tokenizer is cached by (training data, settings), so a second run does not retrain it.
    """
    if spec.train is None:
        name = spec.pretrained or model.pretrained
        assert name is not None  # the recipe validator guarantees a source
        return load_pretrained_tokenizer(name, model.revision, model.trust_remote_code), f"pretrained {name}"
    from transformers import PreTrainedTokenizerFast

    from llmtune.tokenizer_training import train_byte_level_bpe, train_unigram, train_wordpiece

    key = hashlib.sha256(
        json.dumps([data_fingerprint, spec.train.model_dump(mode="json")], sort_keys=True).encode()
    ).hexdigest()[:16]
    where = cache_root(cache_dir) / "tokenizers" / key
    if (where / "tokenizer.json").is_file():
        return ensure_pad_token(PreTrainedTokenizerFast.from_pretrained(str(where))), f"cached {where}"
    t = spec.train
    if t.kind == "wordpiece":
        tok = train_wordpiece(texts(), t.vocab_size, t.min_frequency, t.lowercase, t.special_tokens)
    elif t.kind == "unigram":
        tok = train_unigram(texts(), t.vocab_size, t.num_sentinels, t.special_tokens)
    else:
        tok = train_byte_level_bpe(texts(), t.vocab_size, t.min_frequency, t.special_tokens)
    with atomic_dir(where) as tmp:
        tok.save_pretrained(str(tmp))
    return tok, f"trained {spec.train.kind}, vocab {len(tok)}"


def _scratch_config(spec: ModelSpec) -> Any:
    from transformers import AutoConfig

    raw = spec.from_scratch
    if isinstance(raw, str):
        path = Path(raw)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise UserError(f"model.from_scratch: config file {raw!r} does not exist")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"model.from_scratch: {path} is not valid JSON (line {exc.lineno})") from None
    keys = dict(raw or {})
    model_type = keys.pop("model_type", None)
    if model_type is None:
        raise UserError("model.from_scratch: the config needs a model_type (e.g. gpt2, bert, t5)")
    try:
        return AutoConfig.for_model(model_type, **keys)
    except ValueError as exc:
        raise UserError(f"model.from_scratch: {str(exc).splitlines()[0]}") from None


def context_length(config: Any) -> int | None:
    """The longest sequence the model's position embeddings hold (None when unbounded, e.g. T5)."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def build_model(
    spec: ModelSpec,
    tokenizer: Any,
    auto_class_name: str,
    task_name: str,
    overrides: dict[str, Any] | None = None,
    resumed: bool = False,
) -> Any:
    """The model for a task: `from_pretrained` (hub id or directory) or built from a config with fresh weights.

    A from-scratch model's vocabulary and special-token ids come from the tokenizer. `overrides` are
    the task's config keys (e.g. num_labels and label maps); with them a pretrained checkpoint's head
    of another shape is replaced by a fresh one, as fine-tuning needs. When `resumed`, the run's saved
    tokenizer may hold tokens its task added (relation-classification's entity markers): the embeddings grow
    to hold them, and the checkpoint then restores their rows.
    """
    import transformers
    from transformers import AutoConfig

    auto_class = getattr(transformers, auto_class_name)
    if spec.pretrained is not None:
        try:
            config = AutoConfig.from_pretrained(
                spec.pretrained, revision=spec.revision, trust_remote_code=spec.trust_remote_code
            )
        except Exception as exc:
            raise _load_error("model.pretrained", spec.pretrained, exc) from None
    else:
        config = _scratch_config(spec)
        config.vocab_size = len(tokenizer)
    for key, value in spec.config.items():
        if not hasattr(config, key):
            raise UserError(f"model.config.{key}: {config.model_type} configs have no such key")
        setattr(config, key, value)
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    if spec.from_scratch is not None and getattr(config, "is_encoder_decoder", False):
        config.decoder_start_token_id = tokenizer.pad_token_id  # T5's convention: decoding starts from PAD
    for name in ("bos", "eos", "pad"):
        if getattr(tokenizer, f"{name}_token_id", None) is not None and (
            spec.from_scratch is not None or getattr(config, f"{name}_token_id", None) is None
        ):
            setattr(config, f"{name}_token_id", getattr(tokenizer, f"{name}_token_id"))
    check_task_fits(config, auto_class_name, task_name)
    if spec.pretrained is not None:
        try:
            model = auto_class.from_pretrained(
                spec.pretrained,
                config=config,
                revision=spec.revision,
                trust_remote_code=spec.trust_remote_code,
                ignore_mismatched_sizes=bool(overrides),
            )
        except Exception as exc:
            raise _load_error("model.pretrained", spec.pretrained, exc) from None
    else:
        model = auto_class.from_config(config, trust_remote_code=spec.trust_remote_code)
    if resumed and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    check_vocab(model, tokenizer)
    if getattr(model, "generation_config", None) is not None and model.config.pad_token_id is not None:
        model.generation_config.pad_token_id = model.config.pad_token_id
    return model


def check_task_fits(config: Any, auto_class_name: str, task_name: str) -> None:
    """Refuse a model whose architecture the task's auto class cannot build (e.g. T5 for causal-lm), and an
    encoder for a causal LM (BERT has a causal head class, but as an encoder it reads both directions)."""
    import transformers

    mapping = getattr(transformers.models.auto, auto_class_name)._model_mapping
    if type(config) not in mapping and not getattr(config, "auto_map", None):
        raise UserError(
            f"model: a {config.model_type!r} model cannot do {task_name} ({auto_class_name} does not "
            "know it); choose a model of a fitting family"
        )
    masked = transformers.models.auto.AutoModelForMaskedLM._model_mapping
    if auto_class_name == "AutoModelForCausalLM" and type(config) in masked and not config.is_decoder:
        raise UserError(
            f"model: a {config.model_type!r} model is an encoder (bidirectional), not a causal LM, so it cannot "
            f"do {task_name}; use a decoder such as GPT-2"
        )


def check_trained_for(config: Any, auto_class_name: str, task_name: str, name: str) -> None:
    """Refuse a saved model whose head was trained for another task (its config's `architectures` says which):
    evaluating it would put a fresh, random head on it."""
    import transformers

    saved = list(getattr(config, "architectures", None) or [])
    names = getattr(transformers.models.auto, auto_class_name)._model_mapping._model_mapping
    fitting = {n for value in names.values() for n in ([value] if isinstance(value, str) else value)}
    if saved and not any(arch in fitting for arch in saved):
        raise UserError(
            f"MODEL: {name} holds a {saved[0]}, not a model trained for {task_name} ({auto_class_name}); "
            "pass the run or model that task was trained into, or --task for what this model does"
        )


def load_config(name: str, trust_remote_code: bool = False) -> Any:
    """A saved model's config (run's final/, model directory or hub id)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error("MODEL", name, exc) from None


def check_vocab(model: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids the model's embedding matrix cannot hold."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise UserError(
            f"tokenizer/model mismatch: the tokenizer has {len(tokenizer)} tokens but the model's embeddings "
            f"hold {rows}; use the model's own tokenizer (tokenizer.pretrained) or train the model from scratch"
        )


def load_for_inference(
    name: str, auto_class_name: str, task_name: str, trust_remote_code: bool = False, strategy: Any = None
) -> Any:
    """A saved model (run's final/, model directory, export or hub id) and its tokenizer, for eval and generate.

    A directory holding `model.onnx` (an ONNX export) loads as an ONNX Runtime session (`OnnxModel`).

    A directory an adapter strategy wrote (adapter weights + `llmtune_strategy.json`) loads as its base
    model with the adapter on it; `strategy` is the run's `StrategySpec` (bottleneck adapters need it).
    """
    import transformers

    from llmtune.export.onnx import OnnxModel, is_onnx_directory
    from llmtune.strategies import load_trained, strategy_info

    config = load_config(name, trust_remote_code)
    check_task_fits(config, auto_class_name, task_name)
    if is_onnx_directory(name):  # an ONNX export runs on ONNX Runtime
        check_trained_for(config, auto_class_name, task_name, name)
        return OnnxModel(name, config), load_pretrained_tokenizer(name, trust_remote_code=trust_remote_code)
    adapter = strategy_info(name) is not None
    if not adapter:
        check_trained_for(config, auto_class_name, task_name, name)
    if (
        Path(name).is_dir()
        and not adapter
        and not any(Path(name).glob("*.safetensors"))
        and not any(Path(name).glob("*.bin"))
    ):
        raise UserError(f"MODEL: {name} has a config but no weights (*.safetensors); point at a saved model")
    tokenizer = load_pretrained_tokenizer(name, trust_remote_code=trust_remote_code)
    auto_class = getattr(transformers, auto_class_name)
    try:
        if adapter:
            model = load_trained(name, auto_class, strategy, trust_remote_code)
        else:
            model = auto_class.from_pretrained(name, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except Exception as exc:
        raise _load_error("MODEL", name, exc) from None
    check_vocab(model, tokenizer)
    return model, tokenizer
