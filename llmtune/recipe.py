"""The recipe schema and its loading: YAML file + `--set` overrides -> a validated `Recipe`.

Only pydantic and PyYAML are imported here, so `llmtune validate` answers without touching torch.
Relative paths written in the recipe file resolve against the recipe's folder; relative paths given
with `--set` resolve against the current directory (where the user typed them).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmtune.errors import UserError

BUILTIN_PREFIX = "builtin:"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    """Where the model comes from: a hub id / local directory, or a config to build from scratch."""

    pretrained: str | None = Field(None, description="Hub id or local model directory (from_pretrained).")
    from_scratch: str | dict[str, Any] | None = Field(
        None, description="A config.json path (e.g. configs/models/gpt2-tiny.json) or inline config keys."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Config keys that override either.")
    revision: str | None = None
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.pretrained is None) == (self.from_scratch is None):
            raise ValueError("set exactly one of model.pretrained or model.from_scratch")
        run = Path(self.pretrained) if self.pretrained is not None else None
        if run is not None and (run / "recipe.resolved.yaml").is_file() and (run / "final").is_dir():
            self.pretrained = str(run / "final")  # an llmtune run directory: continue from its final model
        return self


class TokenizerTrainSpec(Section):
    """A tokenizer trained on the training split before the model is built."""

    kind: Literal["byte-level-bpe", "wordpiece", "unigram"] = Field(
        "byte-level-bpe", description="byte-level-bpe (GPT-2), wordpiece (BERT) or unigram (T5, SentencePiece-style)."
    )
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = Field(False, description="Lowercase before tokenising (wordpiece, as uncased BERT).")
    num_sentinels: int = Field(100, ge=1, description="<extra_id_N> sentinels (unigram, for span corruption).")
    special_tokens: list[str] = Field(default_factory=list, description="Extra special tokens to add.")


class TokenizerSpec(Section):
    """The tokenizer: pretrained (defaults to the model's own) or trained from the corpus."""

    pretrained: str | None = None
    train: TokenizerTrainSpec | None = None

    @model_validator(mode="after")
    def _not_both(self) -> TokenizerSpec:
        if self.pretrained is not None and self.train is not None:
            raise ValueError("set only one of tokenizer.pretrained or tokenizer.train")
        return self


class DataSpec(Section):
    """The raw data and how it becomes model inputs."""

    source: str | None = Field(None, description="A built-in corpus, e.g. builtin:pydoc.")
    hub: str | None = Field(None, description="A hub dataset name, e.g. wikitext.")
    hub_config: str | None = Field(None, description="The hub dataset's config, e.g. wikitext-2-raw-v1.")
    revision: str | None = None
    files: dict[str, str | list[str]] | None = Field(
        None, description="Split name -> file(s): .txt, .json/.jsonl, .csv, .parquet."
    )
    format: Literal["text", "json", "csv", "tsv", "parquet", "conll", "squad", "parallel"] | None = Field(
        None,
        description="File format of data.files; default: from the extension (.txt .json .jsonl .csv .tsv "
        ".parquet .conll). conll: one token per line, tag last, blank line between sentences; squad: SQuAD "
        "json (data -> paragraphs -> qas); parallel: a [source, target] pair of line-aligned text files.",
    )
    text_column: str = Field("text", description="The text (LM tasks; the first text of sequence-classification).")
    text_pair_column: str | None = Field(None, description="sequence-classification: the second text of a pair.")
    label_column: str = Field("label", description="sequence-classification labels: ints, strings or floats.")
    tokens_column: str = Field("tokens", description="token-classification: the list of words of each example.")
    tags_column: str = Field("ner_tags", description="token-classification: the list of word tags (str or int).")
    question_column: str = "question"
    context_column: str = "context"
    answers_column: str = Field("answers", description="question-answering: {text: [...], answer_start: [...]}.")
    id_column: str = Field("id", description="question-answering: the example id (made up when absent).")
    source_column: str = Field("source", description="seq2seq source text (a.b reads field b of column a).")
    target_column: str = Field("target", description="seq2seq target text (a.b reads field b of column a).")
    prompt_column: str | None = Field(None, description="causal-lm instruction tuning: the prompt column.")
    response_column: str | None = Field(None, description="causal-lm instruction tuning: the response column.")
    messages_column: str | None = Field(
        None, description="causal-lm chat tuning: a list of {role, content} messages per example."
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="Fine-tuning: longest input in tokens (longer ones are truncated); default 512 "
        "or the model's context, whichever is smaller.",
    )
    train_split: str = "train"
    validation_split: str = "validation"
    validation_fraction: float = Field(
        0.05, gt=0, lt=1, description="Share of training documents carved off when no validation split."
    )
    split_seed: int = Field(0, description="Seed of the validation carve-off (independent of train.seed).")
    block_size: int = Field(256, ge=2)
    eval_stride: int | None = Field(None, ge=1, description="Sliding-window stride; default block_size.")
    num_proc: int | None = Field(None, ge=1)
    cache_dir: str | None = Field(None, description="Tokenised-data cache; default ~/.cache/llmtune.")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [k for k in ("source", "hub", "files") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of data.source, data.hub or data.files")
        if self.source is not None and not self.source.startswith(BUILTIN_PREFIX):
            raise ValueError(f"data.source must name a built-in corpus such as {BUILTIN_PREFIX}pydoc")
        if self.eval_stride is not None and self.eval_stride > self.block_size:
            raise ValueError("data.eval_stride must not exceed data.block_size")
        if (self.prompt_column is None) != (self.response_column is None):
            raise ValueError("set both data.prompt_column and data.response_column (or neither)")
        if self.messages_column is not None and self.prompt_column is not None:
            raise ValueError("set data.messages_column or data.prompt_column/response_column, not both")
        return self

    @property
    def instruction(self) -> bool:
        """Whether causal-lm trains on prompt/response pairs or chats (loss on responses only)."""
        return self.prompt_column is not None or self.messages_column is not None


class OptimizerSpec(Section):
    """The optimizer; weight decay never applies to biases and normalisation weights."""

    kind: Literal["adamw", "sgd", "adafactor"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    fused: bool | None = Field(None, description="Fused AdamW kernel; default: on where torch has it.")


class ScheduleSpec(Section):
    """Learning-rate schedule with linear warmup."""

    kind: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)


class EarlyStoppingSpec(Section):
    """Stop when `metric` has not improved for `patience` evaluations."""

    metric: str = "eval/loss"
    patience: int = Field(3, ge=1)
    mode: Literal["min", "max"] | None = Field(None, description="Default: min for loss/perplexity.")
    min_delta: float = Field(0.0, ge=0)


class TrainSpec(Section):
    """The training loop's settings. `batch_size` is per device."""

    max_steps: int | None = Field(None, ge=1)
    epochs: float | None = Field(None, gt=0)
    batch_size: int = Field(8, ge=1)
    eval_batch_size: int | None = Field(None, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    compile: bool = False
    seed: int = 42
    eval_every: int | None = Field(None, ge=1)
    eval_max_batches: int | None = Field(None, ge=1, description="Cap on validation batches mid-run.")
    log_every: int = Field(10, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_last: int = Field(2, ge=1)
    best_metric: str = "eval/loss"
    early_stopping: EarlyStoppingSpec | None = None
    load_best_at_end: bool = True
    num_workers: int = Field(0, ge=0)
    group_by_length: bool = Field(
        True,
        description="Variable-length tasks: batches of similar-length examples, shuffled batch by batch "
        "(evaluation: sorted by length). Padding is always to the longest example of a batch.",
    )
    head_lr: float | None = Field(None, gt=0, description="Learning rate of the task head; default train.lr.")
    layer_lr_decay: float | None = Field(
        None, gt=0, le=1, description="Layer-wise LR decay: of L blocks, block i (1..L) trains at lr * decay**(L - i)."
    )

    @model_validator(mode="after")
    def _length(self) -> TrainSpec:
        if self.max_steps is None and self.epochs is None:
            self.epochs = 1.0
        return self


class MaskingSpec(Section):
    """Masked-LM masking (BERT): chosen share of non-special tokens, split 80/10/10 mask/random/keep."""

    mlm_probability: float = Field(0.15, gt=0, lt=1)
    mask_fraction: float = Field(0.8, ge=0, le=1, description="Chosen tokens replaced by [MASK].")
    random_fraction: float = Field(0.1, ge=0, le=1, description="Chosen tokens replaced by a random token.")
    whole_word_masking: bool = False

    @model_validator(mode="after")
    def _fractions(self) -> MaskingSpec:
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("masking.mask_fraction + masking.random_fraction must not exceed 1")
        return self


class SpanCorruptionSpec(Section):
    """T5 span corruption: noise density and mean span length, as published (Raffel et al., 2020)."""

    noise_density: float = Field(0.15, gt=0, lt=1)
    mean_noise_span_length: float = Field(3.0, ge=1)


class ClassificationSpec(Section):
    """sequence-classification: what the labels are."""

    problem: Literal["auto", "single_label", "regression"] = Field(
        "auto", description="auto: regression when the labels are floats, else classes."
    )


class TokenClassificationSpec(Section):
    """token-classification (NER): label alignment to sub-word tokens and the tag scheme."""

    label_all_tokens: bool = Field(
        False, description="Label every sub-token of a word (B- becomes I- after the first); default first only."
    )
    scheme: Literal["IOB2", "IOB1", "IOE1", "IOE2", "IOBES", "BILOU"] = Field(
        "IOB2", description="The tagging scheme seqeval scores entities by."
    )


class QuestionAnsweringSpec(Section):
    """question-answering (extractive): windows over long contexts and answer post-processing."""

    doc_stride: int = Field(128, ge=1, description="Tokens of context shared by consecutive windows.")
    max_answer_length: int = Field(30, ge=1, description="Longest answer in tokens.")
    n_best: int = Field(20, ge=1, description="Start and end candidates kept per window.")
    allow_no_answer: bool = Field(False, description="SQuAD v2: questions may have no answer.")
    null_threshold: float = Field(0.0, description="v2: answer 'no answer' when null score - best > this.")


class Seq2SeqSpec(Section):
    """seq2seq: the source prefix, target length and evaluation by generation."""

    source_prefix: str = Field("", description="Prepended to every source, e.g. 'translate English to German: '.")
    max_target_length: int = Field(128, ge=1)
    num_beams: int = Field(4, ge=1)
    generation_max_length: int | None = Field(None, ge=1, description="Default max_target_length.")
    metrics: list[Literal["bleu", "chrf", "rouge"]] = Field(
        default_factory=lambda: ["bleu", "chrf"], description="bleu/chrf for translation, rouge for summaries."
    )


class InstructionSpec(Section):
    """causal-lm instruction / chat tuning: how prompts and responses become one sequence."""

    template: str = Field(
        "### Instruction:\n{prompt}\n\n### Response:\n",
        description="Prompt template: {prompt} is the prompt column, any other {name} the row's column of that "
        "name (e.g. Alpaca's {input}); the response follows it, then EOS.",
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template for messages; default the tokenizer's, else role headers."
    )
    max_new_tokens: int = Field(128, ge=1, description="predict: the longest response generated (greedy).")


STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "full": (),
    "head": (),
    "top_k": ("k",),
    "adapter": ("adapter_style", "reduction_factor", "non_linearity"),
    "lora": ("r", "alpha", "dropout", "target_modules"),
    "adalora": ("r", "target_r", "alpha", "dropout", "target_modules"),
    "prefix": ("num_virtual_tokens",),
    "prompt": ("num_virtual_tokens",),
    "ia3": ("target_modules", "feedforward_modules"),
}


class StrategySpec(Section):
    """What trains. full: everything; head: the task head on a frozen body; top_k: the last k blocks + head;
    adapter: bottleneck adapters + head; lora / adalora / prefix / prompt / ia3: through peft, + head."""

    kind: Literal["full", "head", "top_k", "adapter", "lora", "adalora", "prefix", "prompt", "ia3"] = "full"
    k: int | None = Field(None, ge=1, description="top_k: how many of the last blocks train (each stack, for T5).")
    adapter_style: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only."
    )
    reduction_factor: int = Field(16, ge=1, description="adapter: hidden size / bottleneck size.")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    r: int = Field(8, ge=1, description="lora: rank; adalora: initial rank.")
    target_r: int = Field(4, ge=1, description="adalora: the average rank the budget schedule ends at.")
    alpha: float = Field(16.0, gt=0, description="lora / adalora scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="lora / adalora dropout on the adapter input.")
    target_modules: list[str] | None = Field(
        None,
        description="lora / adalora / ia3: module names; default: peft's per family (GPT-2 c_attn, BERT query/value).",
    )
    feedforward_modules: list[str] | None = Field(None, description="ia3: which targets are feed-forward layers.")
    num_virtual_tokens: int = Field(20, ge=1, description="prefix / prompt: virtual tokens.")

    @model_validator(mode="after")
    def _keys_of_the_kind(self) -> StrategySpec:
        allowed = set(STRATEGY_KEYS[self.kind])
        # Keys left at their defaults are fine (a resolved recipe writes every key out).
        changed = {k for k in self.model_fields_set if getattr(self, k) != type(self).model_fields[k].default}
        for key in sorted(changed - {"kind"} - allowed):
            users = [kind for kind, keys in STRATEGY_KEYS.items() if key in keys]
            raise ValueError(f"strategy.{key} applies to kind {' / '.join(users)}, not {self.kind}; remove it")
        if self.kind == "top_k" and self.k is None:
            raise ValueError("strategy.kind top_k needs strategy.k (how many of the last blocks train)")
        if self.kind == "adalora" and self.target_r > self.r:
            raise ValueError("strategy.target_r must not exceed strategy.r (adalora prunes ranks down to it)")
        return self


class Bound(Section):
    """An expected range for one final metric."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _some_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("an expect entry needs min, max or both")
        return self


# The task-specific recipe sections: the task each belongs to and its defaults (filled in for that task).
TASK_SECTIONS: dict[str, tuple[str, type[Section]]] = {
    "masking": ("masked-lm", MaskingSpec),
    "span_corruption": ("span-corruption", SpanCorruptionSpec),
    "classification": ("sequence-classification", ClassificationSpec),
    "token_classification": ("token-classification", TokenClassificationSpec),
    "question_answering": ("question-answering", QuestionAnsweringSpec),
    "seq2seq": ("seq2seq", Seq2SeqSpec),
    "instruction": ("causal-lm", InstructionSpec),
}
PRETRAIN_TASKS = ("causal-lm", "masked-lm", "span-corruption")
FINETUNE_TASKS = ("sequence-classification", "token-classification", "question-answering", "seq2seq", "causal-lm")


class Recipe(Section):
    """A whole run: task, model, tokenizer, data, training, expected metrics, output directory."""

    task: Literal[
        "causal-lm",
        "masked-lm",
        "span-corruption",
        "sequence-classification",
        "token-classification",
        "question-answering",
        "seq2seq",
    ]
    model: ModelSpec
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    data: DataSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    masking: MaskingSpec | None = Field(None, description="masked-lm only.")
    span_corruption: SpanCorruptionSpec | None = Field(None, description="span-corruption only.")
    classification: ClassificationSpec | None = Field(None, description="sequence-classification only.")
    token_classification: TokenClassificationSpec | None = Field(None, description="token-classification only.")
    question_answering: QuestionAnsweringSpec | None = Field(None, description="question-answering only.")
    seq2seq: Seq2SeqSpec | None = Field(None, description="seq2seq only.")
    instruction: InstructionSpec | None = Field(None, description="causal-lm with prompt/response or messages.")
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    expect: dict[str, Bound] = Field(default_factory=dict)
    tracking: list[Literal["tensorboard"]] = Field(default_factory=list)
    output_dir: str = "runs/llmtune"

    @model_validator(mode="after")
    def _tokenizer_source(self) -> Recipe:
        if self.model.from_scratch is not None and self.tokenizer == TokenizerSpec():
            raise ValueError("a from-scratch model needs tokenizer.pretrained or tokenizer.train")
        for key, (task, section) in TASK_SECTIONS.items():
            if getattr(self, key) is not None and self.task != task:
                raise ValueError(f"'{key}' applies to task {task}, not {self.task}; remove it")
            wanted = self.task == task and (key != "instruction" or self.data.instruction)
            if wanted and getattr(self, key) is None:
                setattr(self, key, section())
        if self.instruction is not None and not self.data.instruction:
            raise ValueError("'instruction' needs data.prompt_column + data.response_column, or data.messages_column")
        return self


# Keys whose string values are filesystem paths (dotted, "*" = any key of a mapping).
_PATH_KEYS = ("model.from_scratch", "data.files.*", "data.cache_dir", "output_dir")
# Keys that may be a hub id or a local directory: a path only if it looks like one or exists.
_MAYBE_PATH_KEYS = ("model.pretrained", "tokenizer.pretrained")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse one `--set key.path=value`; the value parses exactly like a YAML scalar in the file."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected key.path=value, e.g. --set train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    return key.strip().split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any, item: str) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {item}: {'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value


def _looks_like_path(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value in (".", "..")


def _resolve(value: Any, base: Path, maybe: bool) -> Any:
    if isinstance(value, list):
        return [_resolve(v, base, maybe) for v in value]
    if not isinstance(value, str) or value.startswith(BUILTIN_PREFIX):
        return value
    expanded = Path(value).expanduser()
    if expanded.is_absolute():
        return str(expanded)
    if maybe and not _looks_like_path(value) and not (base / value).exists():
        return value  # a hub id such as "gpt2" or "org/name"
    return str((base / expanded).resolve())


def _resolve_paths(tree: dict[str, Any], recipe_dir: Path, overridden: set[str]) -> None:
    cwd = Path.cwd()
    for pattern, maybe in [(k, False) for k in _PATH_KEYS] + [(k, True) for k in _MAYBE_PATH_KEYS]:
        *parents, leaf = pattern.split(".")
        node: Any = tree
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        keys = list(node) if leaf == "*" else [leaf] if leaf in node else []
        for key in keys:
            dotted = ".".join([*parents, key])
            base = cwd if any(dotted == o or dotted.startswith(o + ".") for o in overridden) else recipe_dir
            if not (key == "from_scratch" and isinstance(node[key], dict)):
                node[key] = _resolve(node[key], base, maybe)


def _tag(annotation: Any) -> str:
    """The name pydantic gives a union member in error locations (e.g. 'str', 'list[str]')."""
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "").replace(" ", "").lower()


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """Pydantic's error location as the recipe's key path (union-member tags dropped), and the section
    class that owns the last key (for suggesting the closest valid key)."""
    path: list[str] = []
    node: Any = Recipe
    owner: type[BaseModel] | None = None
    for part in loc:
        args = [a for a in get_args(node) if a is not type(None)]
        if get_origin(node) in (Union, UnionType):
            if len(args) > 1:  # `part` names the union member the value was tried against: not a key
                node = next((a for a in args if _tag(a) == str(part).lower()), None)
                continue
            node = args[0]
        if isinstance(node, type) and issubclass(node, BaseModel):
            owner = node
            field = node.model_fields.get(part) if isinstance(part, str) else None
            node = field.annotation if field is not None else None
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        elif get_origin(node) in (list, tuple):
            node = get_args(node)[0] if get_args(node) else None
        else:
            node = None
        path.append(str(part))
    return path, owner


def _describe(errors: list[dict[str, Any]]) -> str:
    """One line for the first validation error (merging what a union's members each said about it)."""
    error = errors[0]
    loc, owner = _walk(tuple(error["loc"]))
    path = ".".join(loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        valid = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        parent = ".".join(loc[:-1])
        hint = (
            f"did you mean '{parent + '.' if parent else ''}{close[0]}'?"
            if close
            else f"valid keys here: {', '.join(valid)}"
        )
        return f"unknown key '{path}'; {hint}"
    if kind == "missing":
        return f"missing required key '{path}'"
    if kind == "value_error":
        message = error["msg"].removeprefix("Value error, ")
        return f"{path}: {message}" if loc else message
    said = [e["msg"] for e in errors if _walk(tuple(e["loc"]))[0] == loc and e["type"] != "extra_forbidden"]
    expected = " or ".join(dict.fromkeys(m.removeprefix("Input should be ") for m in said))
    return f"{path}: expected {expected} (got {error.get('input')!r})"


def build_recipe(
    tree: dict[str, Any], recipe_dir: Path, overrides: list[str] | None = None, source: str = "recipe"
) -> Recipe:
    """Apply `--set` overrides to a parsed recipe tree, resolve paths and validate it."""
    tree = yaml.safe_load(yaml.safe_dump(tree))  # a deep copy
    overridden: set[str] = set()
    for item in overrides or []:
        path, value = parse_override(item)
        _set_path(tree, path, value, item)
        overridden.add(".".join(path))
    if "output_dir" not in tree:
        tree["output_dir"] = Recipe.model_fields["output_dir"].default
        overridden.add("output_dir")  # a default is relative to where the user runs, like --set
    _resolve_paths(tree, recipe_dir, overridden)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise UserError(f"{source}: {_describe(exc.errors())}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file; every problem is a one-line `UserError`."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"recipe file {str(file)!r} does not exist; pass the path of a .yaml recipe")
    try:
        tree = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"{file}: not valid YAML{at}; fix the syntax (see `llmtune validate`)") from None
    if not isinstance(tree, dict):
        raise UserError(f"{file}: a recipe must be a YAML mapping (task:, model:, data:, ...)")
    return build_recipe(tree, file.resolve().parent, overrides, source=str(file))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML: every default filled in, every path absolute."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
