"""What trains: one rule per strategy, applied to a built model before training (never a different loop).

- `full`: every parameter trains.
- `head`: the pretrained body (`model.base_model`) is frozen; only the task head trains (classifier,
  token classifier, QA span head, or an LM head that is not tied to the input embeddings).
- `top_k`: the last k transformer blocks (of each stack, for an encoder-decoder), everything above
  them (final norm, pooler) and the head train.
- `adapter`: bottleneck adapters (llmtune.adapters) + the head train; the base is frozen.
- `lora`, `adalora`, `prefix`, `prompt`, `ia3`: through peft, with the head in `modules_to_save`.

Frozen parameters get `requires_grad=False`, so the optimizer never sees them and they hold no
optimizer state. A run with an adapter strategy saves the adapter and head weights alone, with what
is needed to load them back on the base model (`save_model`, `load_trained`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError
from llmtune.recipe import StrategySpec

if TYPE_CHECKING:
    import torch

PEFT_KINDS = ("lora", "adalora", "prefix", "prompt", "ia3")
ADAPTER_KINDS = (*PEFT_KINDS, "adapter")  # strategies that save adapter weights, not a whole model
MERGEABLE = ("lora", "adalora", "ia3")
STRATEGY_FILE = "llmtune_strategy.json"
ADAPTER_WEIGHTS = "adapter.safetensors"  # the bottleneck adapters' and head's weights (kind: adapter)

# transformers auto class -> peft task type (which peft model class wraps it)
_PEFT_TASK_TYPES = {
    "AutoModelForSequenceClassification": "SEQ_CLS",
    "AutoModelForTokenClassification": "TOKEN_CLS",
    "AutoModelForQuestionAnswering": "QUESTION_ANS",
    "AutoModelForSeq2SeqLM": "SEQ_2_SEQ_LM",
    "AutoModelForCausalLM": "CAUSAL_LM",
}


def is_peft(model: Any) -> bool:
    """Whether the model is a peft wrapper."""
    return hasattr(model, "peft_config")


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the parameters outside the pretrained body: the task head.

    A parameter shared with the body (an LM head tied to the input embeddings) belongs to the body.
    In a peft model the head is what peft trains as `modules_to_save`.
    """
    if is_peft(model):
        return {name for name, _ in model.named_parameters() if ".modules_to_save." in name}
    body = getattr(model, "base_model", model)
    if body is model:  # the class has no separate body (e.g. T5 seq2seq: the body is the model)
        inner = {id(p) for name, p in model.named_parameters() if not name.startswith(("lm_head", "score"))}
    else:
        inner = {id(p) for p in body.parameters()}
    return {name for name, p in model.named_parameters() if id(p) not in inner}


_BLOCK = re.compile(r"(?:^|\.)(?:h|layer|layers|block|blocks)\.(\d+)\.")
_EMBEDDING = re.compile(r"(?:embed|wte|wpe|shared)")


def layer_depths(names: list[str], head: set[str]) -> dict[str, int]:
    """Each parameter's depth: 0 for the embeddings, block i (0-based) at i + 1, L + 1 for the head.

    Blocks are found by their index in the name (`h.3.`, `layer.3.`, `block.3.`); an encoder-decoder's
    two stacks are numbered separately, each counted from its own first block. Parameters in no block
    that are not embeddings (final norms, poolers) sit with the last block.
    """
    indices = [int(m.group(1)) for n in names if (m := _BLOCK.search(n))]
    blocks = max(indices) + 1 if indices else 0
    depths = {}
    for name in names:
        match = _BLOCK.search(name)
        if name in head:
            depths[name] = blocks + 1
        elif match:
            depths[name] = int(match.group(1)) + 1
        elif _EMBEDDING.search(name):
            depths[name] = 0
        else:
            depths[name] = blocks
    return depths


@dataclass
class Applied:
    """A model with its strategy applied, and what the training loop must do for it."""

    model: Any
    kind: str
    # called after every optimizer step with the step number (AdaLoRA's rank budget schedule)
    on_step: Callable[[int], None] | None = None
    settings: dict[str, Any] | None = None  # the StrategySpec, recorded with the saved model


def _freeze_all_but(model: torch.nn.Module, trainable: set[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)


def _head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level module names of the head (peft's `modules_to_save`)."""
    return sorted({name.split(".")[0] for name in head_parameter_names(model)})


def _candidates(model: torch.nn.Module) -> list[str]:
    """Leaf module names (last component) of the linear layers a peft target may name."""
    names = set()
    for name, module in model.named_modules():
        if name and not list(module.children()) and hasattr(module, "weight") and module.weight.ndim == 2:
            names.add(name.split(".")[-1])
    return sorted(names)


def _check_targets(model: torch.nn.Module, targets: list[str], key: str) -> None:
    modules = [name for name, _ in model.named_modules()]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in modules):
            raise UserError(
                f"strategy.{key}: no module {target!r} in this {model.config.model_type} model; candidates: "
                + ", ".join(_candidates(model))
            )


def _default_targets(model: torch.nn.Module, kind: str) -> tuple[list[str], list[str] | None]:
    from peft.utils import constants

    family = model.config.model_type
    table = {
        "lora": constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
        "adalora": constants.TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
        "ia3": constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    }[kind]
    if family not in table:
        raise UserError(
            f"strategy.target_modules: peft knows no default {kind} targets for {family!r}; name them, e.g. "
            f"target_modules: [{', '.join(_candidates(model)[:2])}]"
        )
    feedforward = None
    if kind == "ia3":
        feedforward = list(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(family, []))
    return list(table[family]), feedforward


def _peft_config(model: torch.nn.Module, spec: StrategySpec, auto_class: str, total_steps: int) -> Any:
    import peft

    task_type = _PEFT_TASK_TYPES.get(auto_class)
    if task_type is None:
        raise UserError(f"strategy.kind: {spec.kind} does not serve models of class {auto_class}")
    common: dict[str, Any] = {"task_type": task_type, "modules_to_save": _head_modules(model) or None}
    if spec.kind in ("prefix", "prompt"):
        if auto_class in ("AutoModelForTokenClassification", "AutoModelForQuestionAnswering"):
            raise UserError(
                f"strategy.kind: {spec.kind} tuning adds virtual tokens, which token-level tasks cannot label "
                "(peft supports it for classification, seq2seq and causal LM); use lora, ia3 or adapter"
            )
        if spec.kind == "prefix" and task_type not in ("CAUSAL_LM", "SEQ_2_SEQ_LM"):
            # peft's classification wrapper looks for a `past_key_values` argument, which transformers 5
            # renamed `cache`; its causal-LM and seq2seq wrappers pass the prefixes through fine.
            raise UserError(
                f"strategy.kind: peft cannot apply prefix to a {model.config.model_type} classifier with "
                "transformers 5 (it needs a past_key_values argument); use prompt or lora"
            )
        config_class = peft.PrefixTuningConfig if spec.kind == "prefix" else peft.PromptTuningConfig
        common.pop("modules_to_save")  # prompt learning trains its head through peft's task model
        return config_class(num_virtual_tokens=spec.num_virtual_tokens, **common)
    targets, feedforward = (spec.target_modules, spec.feedforward_modules)
    if targets is None:
        targets, default_ff = _default_targets(model, spec.kind)
        feedforward = feedforward if feedforward is not None else default_ff
    _check_targets(model, targets, "target_modules")
    if spec.kind == "ia3":
        feedforward = feedforward or []
        missing = [m for m in feedforward if m not in targets]
        if missing:
            raise UserError(f"strategy.feedforward_modules: {missing} must also be in target_modules")
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **common)
    lora = {"target_modules": targets, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout}
    if spec.kind == "adalora":
        # The rank budget schedule needs the run's length: warm up for 10% of it, prune until 70%.
        return peft.AdaLoraConfig(
            init_r=spec.r,
            target_r=spec.target_r,
            total_step=total_steps,
            tinit=max(1, total_steps // 10),
            tfinal=max(1, total_steps * 3 // 10),
            **lora,
            **common,
        )
    return peft.LoraConfig(r=spec.r, **lora, **common)


def _top_k(model: torch.nn.Module, k: int) -> set[str]:
    names = [name for name, _ in model.named_parameters()]
    head = head_parameter_names(model)
    stacks: dict[str, set[int]] = {}
    for name in names:
        if match := _BLOCK.search(name):
            stacks.setdefault(name[: match.start()], set()).add(int(match.group(1)))
    if not stacks:
        raise UserError(f"strategy.kind: top_k found no numbered blocks in this {model.config.model_type} model")
    fewest = min(len(blocks) for blocks in stacks.values())
    if k > fewest:
        raise UserError(f"strategy.k: {k} is more than the model's {fewest} blocks; set strategy.k <= {fewest}")
    trainable = set(head)
    for name in names:
        match = _BLOCK.search(name)
        if match:
            blocks = stacks[name[: match.start()]]
            if int(match.group(1)) >= max(blocks) + 1 - k:
                trainable.add(name)
        elif not _EMBEDDING.search(name):
            trainable.add(name)  # final norms and poolers sit above the last block
    return trainable


def apply_strategy(
    model: torch.nn.Module, spec: StrategySpec, auto_class: str, total_steps: int, from_scratch: bool = False
) -> Applied:
    """Freeze what the strategy says does not train (or wrap the model with peft); refuse what cannot work."""
    if spec.kind == "full":
        return Applied(model, spec.kind, settings=spec.model_dump(mode="json"))
    if from_scratch:
        raise UserError(
            f"strategy.kind: {spec.kind} keeps a pretrained body frozen, but model.from_scratch has none; "
            "use kind: full, or model.pretrained"
        )
    if spec.kind == "head":
        head = head_parameter_names(model)
        if not head:
            raise UserError(
                f"strategy.kind: head: a {model.config.model_type} {type(model).__name__} has no task head apart "
                "from its body (its LM head is tied to the input embeddings); use kind: full, or untie it with "
                "model.config.tie_word_embeddings: false"
            )
        _freeze_all_but(model, head)
        return Applied(model, spec.kind, settings=spec.model_dump(mode="json"))
    if spec.kind == "top_k":
        assert spec.k is not None  # the recipe requires it
        _freeze_all_but(model, _top_k(model, spec.k))
        return Applied(model, spec.kind, settings=spec.model_dump(mode="json"))
    if spec.kind == "adapter":
        from llmtune.adapters import add_adapters

        head = head_parameter_names(model)
        add_adapters(model, spec.adapter_style, spec.reduction_factor, spec.non_linearity)
        _freeze_all_but(model, head | {n for n, _ in model.named_parameters() if ".adapter." in n})
        return Applied(model, spec.kind, settings=spec.model_dump(mode="json"))
    import peft

    config = _peft_config(model, spec, auto_class, total_steps)
    try:
        wrapped = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. prefix tuning on a model without a key/value cache (BERT)
        first = str(exc).strip().splitlines()[0]
        raise UserError(
            f"strategy.kind: peft cannot apply {spec.kind} to {model.config.model_type} models ({first}); "
            "use another strategy, e.g. lora"
        ) from None
    on_step = None
    if spec.kind == "adalora":
        on_step = wrapped.base_model.update_and_allocate
    return Applied(wrapped, spec.kind, on_step, spec.model_dump(mode="json"))


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; a peft model's frozen copies of saved modules are not counted twice."""
    total = trainable = 0
    for name, param in model.named_parameters():
        if ".original_module." in name:
            continue
        total += param.numel()
        trainable += param.numel() if param.requires_grad else 0
    return total, trainable


def save_model(
    model: Any,
    target: Path,
    state_dict: dict[str, Any],
    kind: str,
    base: str | None,
    settings: dict[str, Any] | None = None,
) -> None:
    """A model directory: a whole Hugging Face model, or (adapter strategies) the adapter and head weights
    alone with the fine-tuned config. Either way `llmtune_strategy.json` records the strategy, the total
    and trainable parameters, the adapter's size on disk and the base model it loads on."""
    total, trainable = count_parameters(model)
    size = None
    if kind not in ADAPTER_KINDS:
        model.save_pretrained(str(target), state_dict=state_dict)
    else:
        if is_peft(model):
            model.save_pretrained(str(target))
            config = model.get_base_model().config
            if getattr(model.get_base_model(), "generation_config", None) is not None:
                model.get_base_model().generation_config.save_pretrained(str(target))
        else:
            from safetensors.torch import save_file

            weights = {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}
            save_file(weights, str(target / ADAPTER_WEIGHTS))
            config = model.config
        config.save_pretrained(str(target))
        size = sum(f.stat().st_size for f in target.iterdir() if "adapter" in f.name and f.suffix == ".safetensors")
    info = {"kind": kind, "base": base if kind in ADAPTER_KINDS else None, "settings": settings}
    info.update(total_parameters=total, trainable_parameters=trainable, adapter_bytes=size)
    (target / STRATEGY_FILE).write_text(json.dumps(info, indent=1))


def strategy_info(directory: str | Path) -> dict[str, Any] | None:
    """What `save_model` recorded of an adapter run's model directory (None for a whole model)."""
    path = Path(directory) / STRATEGY_FILE
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    return info if info.get("kind") in ADAPTER_KINDS else None


def load_trained(directory: str, auto_class: Any, spec: StrategySpec | None, trust_remote_code: bool) -> Any:
    """A saved adapter run's model: its base (from `llmtune_strategy.json`) with the adapter loaded on it.

    The base is built with the fine-tuned config (label maps, head size); the head's weights come from
    the adapter files. For bottleneck adapters `spec` says how they were built (the run's recipe).
    """
    from transformers import AutoConfig

    info = strategy_info(directory)
    assert info is not None
    config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    base = auto_class.from_pretrained(
        info["base"], config=config, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code
    )
    if info["kind"] in PEFT_KINDS:
        import peft

        return peft.PeftModel.from_pretrained(base, directory)
    from safetensors.torch import load_file

    from llmtune.adapters import add_adapters

    if (spec is None or spec.kind != "adapter") and info.get("settings"):
        spec = StrategySpec.model_validate(info["settings"])
    if spec is None or spec.kind != "adapter":
        raise UserError(f"MODEL: {directory} holds bottleneck adapters; evaluate the run directory, which says how")
    add_adapters(base, spec.adapter_style, spec.reduction_factor, spec.non_linearity)
    weights = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    missing = set(weights) - {n for n, _ in base.named_parameters()}
    if missing:
        raise UserError(f"MODEL: {directory}: adapter weights do not fit the base model ({sorted(missing)[0]})")
    base.load_state_dict(weights, strict=False)
    return base


def merge(model: Any, kind: str) -> Any:
    """A standalone model with LoRA / AdaLoRA / IA3 folded into the base weights."""
    if kind not in MERGEABLE:
        raise UserError(
            f"export --merge: a {kind!r} model cannot be merged into its base weights (only "
            f"{', '.join(MERGEABLE)} can); evaluate it with its adapter instead"
        )
    return model.merge_and_unload()
