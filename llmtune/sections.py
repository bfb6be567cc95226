"""The recipe's general sections (pydantic), shared by every task.

A leaf: only pydantic is imported, so the task registry (`llmtune.tasks.registry`, which declares the
task-specific sections) and the recipe schema (`llmtune.recipe.schema`, which puts everything together)
can both build on it without importing each other in a circle. Every field carries a description:
`llmtune keys` prints them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BUILTIN_PREFIX = "builtin:"


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, never silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
    """Where the model comes from: a hub id / local directory, or a config to build from scratch."""

    pretrained: str | None = Field(
        None, description="Hub id, local model directory or llmtune run directory (its final/) to start from."
    )
    from_scratch: str | dict[str, Any] | None = Field(
        None, description="A config.json path (e.g. configs/models/gpt2-tiny.json) or inline config keys."
    )
    config: dict[str, Any] = Field(default_factory=dict, description="Config keys that override either.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model.pretrained.")
    trust_remote_code: bool = Field(
        False, description="Run modelling code shipped with a hub model (off: only transformers' own classes)."
    )

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
    vocab_size: int = Field(8192, ge=300, description="Tokens in the trained vocabulary, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A merge / piece must occur this often to be learnt.")
    lowercase: bool = Field(False, description="Lowercase before tokenising (wordpiece, as uncased BERT).")
    num_sentinels: int = Field(100, ge=1, description="<extra_id_N> sentinels (unigram, for span corruption).")
    special_tokens: list[str] = Field(default_factory=list, description="Extra special tokens to add.")


class TokenizerSpec(Section):
    """The tokenizer: pretrained (defaults to the model's own) or trained from the columns the task reads."""

    pretrained: str | None = Field(None, description="Hub id or local directory; default: the model's own.")
    train: TokenizerTrainSpec | None = Field(
        None, description="Train one on the training split's text columns (the ones the task reads)."
    )

    @model_validator(mode="after")
    def _not_both(self) -> TokenizerSpec:
        if self.pretrained is not None and self.train is not None:
            raise ValueError("set only one of tokenizer.pretrained or tokenizer.train")
        return self


FileFormat = Literal["text", "json", "csv", "tsv", "parquet", "conll", "squad", "parallel", "semeval2010"]


class DataSpecBase(Section):
    """Where the raw data comes from and how it is split; the column keys come from the task registry."""

    source: str | None = Field(None, description="A built-in corpus, e.g. builtin:pydoc.")
    hub: str | None = Field(None, description="A hub dataset name, e.g. wikitext.")
    hub_config: str | None = Field(None, description="The hub dataset's config, e.g. wikitext-2-raw-v1.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of data.hub.")
    files: dict[str, str | list[str]] | None = Field(
        None, description="Split name -> file(s): .txt, .json/.jsonl, .csv, .tsv, .parquet, .conll."
    )
    format: FileFormat | None = Field(
        None,
        description="File format of data.files; default: from the extension (.txt .json .jsonl .csv .tsv "
        ".parquet .conll). conll: one token per line, tag last, blank line between sentences; squad: SQuAD "
        "json (data -> paragraphs -> qas); parallel: a [source, target] pair of line-aligned text files; "
        "semeval2010: the SemEval-2010 Task 8 release files (numbered sentences with <e1>/<e2>, label lines).",
    )
    sample_by: Literal["auto", "line", "paragraph", "document"] = Field(
        "auto",
        description="Text files: one example per line, per paragraph (blank-line separated) or per file; "
        "auto: paragraphs when the file has blank lines, else lines. Blank examples are skipped and counted.",
    )
    max_length: int | None = Field(
        None,
        ge=8,
        description="Fine-tuning: longest input in tokens (longer ones are truncated); default 512 "
        "or the model's context, whichever is smaller.",
    )
    train_split: str = Field("train", description="The name of the training split in the source.")
    validation_split: str = Field("validation", description="The name of the validation split in the source.")
    validation_fraction: float = Field(
        0.05, gt=0, lt=1, description="Share of training examples carved off when the source has no validation split."
    )
    split_seed: int = Field(0, description="Seed of the validation carve-off (independent of train.seed).")
    block_size: int = Field(256, ge=2, description="Pretraining: tokens per training block and evaluation window.")
    eval_stride: int | None = Field(
        None, ge=1, description="causal-lm perplexity: sliding-window stride; default block_size (no overlap)."
    )
    num_proc: int | None = Field(None, ge=1, description="Processes that tokenise in parallel; default one.")
    cache_dir: str | None = Field(
        None, description="Tokenised-data and trained-tokenizer cache; default $LLMTUNE_CACHE or ~/.cache/llmtune."
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataSpecBase:
        given = [k for k in ("source", "hub", "files") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of data.source, data.hub or data.files")
        if self.source is not None and not self.source.startswith(BUILTIN_PREFIX):
            raise ValueError(f"data.source must name a built-in corpus such as {BUILTIN_PREFIX}pydoc")
        if self.eval_stride is not None and self.eval_stride > self.block_size:
            raise ValueError("data.eval_stride must not exceed data.block_size")
        return self


class OptimizerSpec(Section):
    """The optimizer; weight decay never applies to biases and normalisation weights."""

    kind: Literal["adamw", "sgd", "adafactor"] = Field("adamw", description="adamw, sgd or adafactor.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's beta1 and beta2.")
    eps: float = Field(1e-8, gt=0, description="AdamW's epsilon.")
    momentum: float = Field(0.0, ge=0, description="SGD momentum.")
    fused: bool | None = Field(None, description="Fused AdamW kernel; default: on where torch has it.")


class ScheduleSpec(Section):
    """Learning-rate schedule with linear warmup."""

    kind: Literal["constant", "linear", "cosine"] = Field(
        "cosine", description="After warmup: constant, linear decay to 0, or cosine decay to 0."
    )
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps of linear warmup from 0 to train.lr.")


class EarlyStoppingSpec(Section):
    """Stop when `metric` has not improved for `patience` evaluations."""

    metric: str = Field("eval/loss", description="The evaluation metric watched (one the task reports).")
    patience: int = Field(3, ge=1, description="Evaluations without improvement before stopping.")
    mode: Literal["min", "max"] | None = Field(
        None, description="Override the metric's declared direction (min: lower is better)."
    )
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class TrainSpec(Section):
    """The training loop's settings. `batch_size` is per device."""

    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train; overrides epochs.")
    epochs: float | None = Field(None, gt=0, description="Passes over the training split (default 1).")
    batch_size: int = Field(8, ge=1, description="Examples per micro-batch, per device.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        description="Variable-length tasks: fill each training micro-batch up to this many tokens per device "
        "(rows x longest row, padding included) instead of batch_size rows; rows sorted by length, batches "
        "reshuffled each epoch.",
    )
    eval_batch_size: int | None = Field(None, ge=1, description="Evaluation batch size; default batch_size.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (loss normalised over all).")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norm weights).")
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec, description="The optimizer.")
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec, description="The learning-rate schedule.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this; null: no.")
    precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description='Mixed precision: "no" (fp32), bf16 or fp16 (GPU; fp16 with a loss scaler).'
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    compile: bool = Field(False, description="torch.compile the model (through accelerate, inductor).")
    fast_kernels: bool = Field(
        True,
        description="Train with faster kernels that compute the same function (fused tanh GELU for gelu_new; "
        "GPT-2's loss without full logits); the saved model is unchanged. false: the model's own code.",
    )
    seed: int = Field(42, description="Seeds initialisation, data order, dropout, masks and spans.")
    eval_every: int | None = Field(None, ge=1, description="Evaluate every N optimizer steps (and at the end).")
    eval_max_batches: int | None = Field(None, ge=1, description="Cap on validation batches mid-run.")
    log_every: int = Field(10, ge=1, description="Log loss, learning rate and throughput every N steps.")
    save_every: int | None = Field(None, ge=1, description="Write a resumable checkpoint every N steps.")
    keep_last: int = Field(2, ge=1, description="Step checkpoints kept; the best model is kept apart.")
    best_metric: str = Field(
        "eval/loss", description="The metric that picks the best evaluation (its direction is the task's declaration)."
    )
    early_stopping: EarlyStoppingSpec | None = Field(None, description="Stop when a metric stops improving.")
    load_best_at_end: bool = Field(True, description="final/ holds the best evaluated model rather than the last.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
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

    kind: Literal["full", "head", "top_k", "adapter", "lora", "adalora", "prefix", "prompt", "ia3"] = Field(
        "full", description="full, head, top_k, adapter, lora, adalora, prefix, prompt or ia3."
    )
    k: int | None = Field(None, ge=1, description="top_k: how many of the last blocks train (each stack, for T5).")
    adapter_style: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only."
    )
    reduction_factor: int = Field(16, ge=1, description="adapter: hidden size / bottleneck size.")
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = Field(
        "relu", description="adapter: the bottleneck's activation."
    )
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

    min: float | None = Field(None, description="The metric must be at least this.")
    max: float | None = Field(None, description="The metric must be at most this.")

    @model_validator(mode="after")
    def _some_bound(self) -> Bound:
        if self.min is None and self.max is None:
            raise ValueError("an expect entry needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class MetricModuleSpec(Section):
    """An `evaluate` metric module computed on the task's predictions and references at every evaluation."""

    module: str = Field(description="A hub metric id (e.g. accuracy) or a local metric script (./my_metric.py).")
    name: str | None = Field(
        None, description="Reported as eval/<name> (one value) or eval/<name>_<key>; default: the module's name."
    )
    higher_is_better: bool = Field(True, description="The direction best_metric / early_stopping use for it.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of compute(), e.g. average.")

    @property
    def label(self) -> str:
        """The name its values are reported under (after eval/)."""
        return self.name or Path(self.module).stem.replace("-", "_")
