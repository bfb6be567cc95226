"""Every task's declaration: the one place that says what a task is, takes and reports.

An entry names the task's class (imported only when the task runs), the commands that train it, its
options section, the data columns it reads and the metrics it reports with their direction. The
recipe schema derives from these entries its `task:` values, its task sections, its `data.*_column`
keys and the metric checks of `best_metric`, `early_stopping` and `expect:`; the CLI derives which
command trains which task. Only pydantic is imported here, so `llmtune validate` stays torch-free.

Adding a task (see also `llmtune/tasks/__init__.py`):
1. write `llmtune/tasks/<name>.py` with a class that follows `llmtune.tasks.base.Task`;
2. add its options section (if it has any) and one `TaskEntry` to `TASKS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Literal

from pydantic import Field, model_validator

from llmtune.sections import Section

Command = Literal["pretrain", "finetune"]


@dataclass(frozen=True)
class Column:
    """A `data.<key>` recipe key naming a column the task reads."""

    key: str
    default: str | None
    description: str
    role: Literal["input", "labels", "optional"] = "input"  # labels: not needed by `llmtune predict`
    text: bool = False  # a trained tokenizer learns from it (tokenizer.train)
    cells: Literal["text", "scalar", "list", "any"] = "text"  # what each cell must hold (checked on load)


@dataclass(frozen=True)
class Metric:
    """A metric a task reports: its name (or a glob pattern such as eval/f1_*) and its direction.

    `higher_is_better` None marks a count (tokens, lengths): reported, checkable by `expect:`, never
    a quality to select or stop on.
    """

    name: str
    higher_is_better: bool | None

    def matches(self, name: str) -> bool:
        """Whether `name` is this metric (or one of the names its pattern stands for)."""
        return fnmatchcase(name, self.name)


@dataclass(frozen=True)
class TaskEntry:
    """One task: what the recipe calls it, where its code is, what it reads and what it reports."""

    name: str  # unique; the run log and errors use it
    target: str  # "module:Class", imported when the task runs
    commands: tuple[Command, ...]
    description: str
    columns: tuple[Column, ...]
    metrics: tuple[Metric, ...]
    task: str = ""  # the recipe's `task:` value; default `name` (a variant shares its base task's)
    section: str | None = None  # the recipe section holding the task's options
    options: type[Section] | None = None
    selected_by: tuple[str, ...] = ()  # a variant of `task`, chosen when one of these data keys is set
    select: Callable[[Any], Iterable[str]] | None = None  # the metric names a recipe's options make it report
    check: Callable[[Any], None] | None = None  # raises ValueError for data settings the task cannot take
    predicts: bool = False  # per-example predictions (llmtune predict, eval --predictions)
    scored_pairs: bool = False  # evaluation yields predictions + references that `evaluate` modules can score

    @property
    def recipe_task(self) -> str:
        """The `task:` value that selects this entry."""
        return self.task or self.name

    def reported(self, recipe: Any) -> list[Metric]:
        """The metrics this task reports under `recipe` (its options can narrow the catalog)."""
        if self.select is None:
            return list(self.metrics)
        names = set(self.select(recipe))
        return [m for m in self.metrics if m.name in names]


# --- shared declarations ------------------------------------------------------------------------------------------

TEXT = Column("text_column", "text", "The text (LM tasks; the first text of sequence-classification).", text=True)
LM_METRICS = (Metric("eval/loss", False), Metric("eval/perplexity", False), Metric("eval/tokens", None))


# --- pretraining objectives -----------------------------------------------------------------------------------------


class MaskingSpec(Section):
    """Masked-LM masking (BERT): chosen share of non-special tokens, split 80/10/10 mask/random/keep."""

    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Share of non-special tokens chosen for the loss.")
    mask_fraction: float = Field(0.8, ge=0, le=1, description="Chosen tokens replaced by [MASK].")
    random_fraction: float = Field(0.1, ge=0, le=1, description="Chosen tokens replaced by a random token.")
    whole_word_masking: bool = Field(False, description="Mask every piece of a chosen word together.")

    @model_validator(mode="after")
    def _fractions(self) -> MaskingSpec:
        if self.mask_fraction + self.random_fraction > 1:
            raise ValueError("masking.mask_fraction + masking.random_fraction must not exceed 1")
        return self


class SpanCorruptionSpec(Section):
    """T5 span corruption: noise density and mean span length, as published (Raffel et al., 2020)."""

    noise_density: float = Field(0.15, gt=0, lt=1, description="Share of tokens inside corrupted spans.")
    mean_noise_span_length: float = Field(3.0, ge=1, description="Mean length of a corrupted span in tokens.")


# --- fine-tuning tasks -----------------------------------------------------------------------------------------------


class ClassificationSpec(Section):
    """sequence-classification: what the labels are."""

    problem: Literal["auto", "single_label", "regression"] = Field(
        "auto", description="auto: regression when the labels are floats, else classes."
    )


CLASS_METRICS = ("eval/loss", "eval/accuracy", "eval/macro_f1", "eval/matthews")
REGRESSION_METRICS = ("eval/loss", "eval/pearson", "eval/spearman", "eval/mse")


def _classification_metrics(recipe: Any) -> tuple[str, ...]:
    problem = recipe.classification.problem
    if problem == "auto":  # not known before the labels are seen: either set may come
        return CLASS_METRICS + REGRESSION_METRICS
    return REGRESSION_METRICS if problem == "regression" else CLASS_METRICS


class TokenClassificationSpec(Section):
    """token-classification (NER): label alignment to sub-word tokens and the tag scheme."""

    label_all_tokens: bool = Field(
        False, description="Label every sub-token of a word (B- becomes I- after the first); default first only."
    )
    scheme: Literal["IOB2", "IOB1", "IOE1", "IOE2", "IOBES", "BILOU"] = Field(
        "IOB2", description="The tagging scheme seqeval scores entities by."
    )

    @model_validator(mode="after")
    def _alignment(self) -> TokenClassificationSpec:
        if self.label_all_tokens and self.scheme not in ("IOB1", "IOB2"):
            raise ValueError(
                f"label_all_tokens is supported for IOB1/IOB2 tags, not {self.scheme}; set it to false "
                "(only each word's first sub-token is labelled)"
            )
        return self


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
    max_target_length: int = Field(128, ge=1, description="Targets are truncated to this many tokens.")
    num_beams: int = Field(4, ge=1, description="Beam size of evaluation and prediction.")
    generation_max_length: int | None = Field(
        None, ge=1, description="Longest generated text in tokens; default max_target_length."
    )
    metrics: list[Literal["bleu", "chrf", "rouge"]] = Field(
        default_factory=lambda: ["bleu", "chrf"], description="bleu/chrf for translation, rouge for summaries."
    )


ROUGE_KINDS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def _seq2seq_metrics(recipe: Any) -> list[str]:
    names = ["eval/loss", "eval/gen_len"]
    for metric in recipe.seq2seq.metrics:
        names.extend(f"eval/{kind}" for kind in (ROUGE_KINDS if metric == "rouge" else (metric,)))
    return names


def _check_instruction_columns(data: Any) -> None:
    if (data.prompt_column is None) != (data.response_column is None):
        raise ValueError("set both data.prompt_column and data.response_column (or neither)")
    if data.messages_column is not None and data.prompt_column is not None:
        raise ValueError("set data.messages_column or data.prompt_column/response_column, not both")


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
    pack: bool = Field(
        False,
        description="Training: put several examples in one row of up to data.max_length tokens, each attending "
        "only to itself (positions restart per example; the loss counts the same tokens as unpacked).",
    )


class DialogueSpec(Section):
    """dialogue: the conversation format, which turns are trained on, and evaluation by generation."""

    format: Literal["messages", "sharegpt", "text"] = Field(
        "messages",
        description="messages: lists of {role, content} (OpenAI); sharegpt: lists of {from, value}; text: one "
        "string per conversation, turns joined by dialogue.separator (DailyDialog).",
    )
    roles: dict[str, Literal["system", "user", "assistant"]] = Field(
        default_factory=lambda: {
            "human": "user",
            "gpt": "assistant",
            "system": "system",
            "user": "user",
            "assistant": "assistant",
        },
        description="messages / sharegpt: each role (or ShareGPT `from`) name of the data -> system, user or "
        "assistant (default human, user -> user; gpt, assistant -> assistant; system -> system); a name not "
        "listed is an error.",
    )
    separator: str = Field("__eou__", min_length=1, description="text: what ends (or separates) the turns.")
    first_speaker: Literal["user", "assistant"] = Field(
        "user", description="text: the role of the first turn; the speakers alternate."
    )
    system_prompt: str | None = Field(
        None, description="A system message put first in every conversation that has none of its own."
    )
    train_on: Literal["all", "last"] = Field(
        "all", description="all: the loss counts every assistant turn; last: only each conversation's last one."
    )
    chat_template: str | None = Field(
        None, description="A Jinja chat template; default the tokenizer's, else role headers (### User: ...)."
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest generated response (evaluation, predict).")
    eval_conversations: int = Field(
        16,
        ge=0,
        description="Evaluation generates the responses of the first this many validation conversations and "
        "scores them (BLEU, ROUGE-L, distinct-1/2); 0: perplexity only.",
    )
    eval_turns: int = Field(4, ge=1, description="At most this many assistant turns generated per conversation.")
    pack: bool = Field(
        False,
        description="Training: put several conversations in one row of up to data.max_length tokens, each attending "
        "only to itself (positions restart per conversation; the loss counts the same tokens as unpacked).",
    )


DIALOGUE_GENERATION_METRICS = ("eval/bleu", "eval/rougeL", "eval/distinct_1", "eval/distinct_2", "eval/gen_len")


def _dialogue_metrics(recipe: Any) -> list[str]:
    names = [m.name for m in LM_METRICS]
    if recipe.dialogue.eval_conversations > 0:
        names += [*DIALOGUE_GENERATION_METRICS, "eval/responses"]
    return names


class RelationSpec(Section):
    """relation-classification: how the two marked entities become a relation, and which label means none."""

    pooling: Literal["entity_start", "cls"] = Field(
        "entity_start",
        description="entity_start: the hidden states at the <e1> and <e2> markers, concatenated, then a linear "
        "layer (Baldini Soares et al., 2019; saved as a token-classification model); cls: the pooled sequence "
        "(a plain sequence-classification model).",
    )
    negative_label: str = Field(
        "Other", description="The label meaning no relation (Other, no_relation): left out of micro-F1 and SemEval F1."
    )
    per_relation: bool = Field(False, description="Also report eval/f1_<label> for every relation label.")


RELATION_METRICS = (
    "eval/loss",
    "eval/accuracy",
    "eval/micro_precision",
    "eval/micro_recall",
    "eval/micro_f1",
    "eval/semeval_macro_f1",
)


def _relation_metrics(recipe: Any) -> tuple[str, ...]:
    return RELATION_METRICS + (("eval/f1_*",) if recipe.relation.per_relation else ())


def _check_relation_columns(data: Any) -> None:
    if (data.e1_span_column is None) != (data.e2_span_column is None):
        raise ValueError("set both data.e1_span_column and data.e2_span_column (or neither, for inline <e1> markers)")


# --- the registry ---------------------------------------------------------------------------------------------------

TASKS: tuple[TaskEntry, ...] = (
    TaskEntry(
        name="causal-lm",
        target="llmtune.tasks.causal_lm:CausalLM",
        commands=("pretrain", "finetune"),
        description="Next-token prediction on packed text blocks; sliding-window perplexity.",
        columns=(TEXT,),
        metrics=LM_METRICS,
    ),
    TaskEntry(
        name="instruction-tuning",
        task="causal-lm",
        target="llmtune.tasks.instruction:InstructionTuning",
        commands=("finetune",),
        description="causal-lm on prompt/response pairs or chats, the loss on responses only.",
        section="instruction",
        options=InstructionSpec,
        selected_by=("prompt_column", "messages_column"),
        columns=(
            Column("prompt_column", None, "Instruction tuning: the prompt column.", text=True),
            Column("response_column", None, "Instruction tuning: the response column.", role="labels", text=True),
            Column(
                "messages_column",
                None,
                "Chat tuning: a list of {role, content} messages per example.",
                text=True,
                cells="list",
            ),
        ),
        metrics=LM_METRICS,
        check=_check_instruction_columns,
        predicts=True,
    ),
    TaskEntry(
        name="dialogue",
        target="llmtune.tasks.dialogue:Dialogue",
        commands=("finetune",),
        description="Chat tuning of a causal LM on conversations (messages, ShareGPT, separator-joined text).",
        section="dialogue",
        options=DialogueSpec,
        columns=(
            Column(
                "dialogue_column",
                None,
                "dialogue: the column holding each conversation; default messages, conversations or text "
                "(by dialogue.format).",
                text=True,
                cells="any",
            ),
        ),
        metrics=(
            *LM_METRICS,
            Metric("eval/bleu", True),
            Metric("eval/rougeL", True),
            Metric("eval/distinct_1", True),
            Metric("eval/distinct_2", True),
            Metric("eval/gen_len", None),
            Metric("eval/responses", None),
        ),
        select=_dialogue_metrics,
        predicts=True,
    ),
    TaskEntry(
        name="masked-lm",
        target="llmtune.tasks.masked_lm:MaskedLM",
        commands=("pretrain",),
        description="BERT masked language modelling with dynamic masks.",
        section="masking",
        options=MaskingSpec,
        columns=(TEXT,),
        metrics=(
            Metric("eval/loss", False),
            Metric("eval/mlm_perplexity", False),
            Metric("eval/masked_accuracy", True),
            Metric("eval/masked_tokens", None),
        ),
    ),
    TaskEntry(
        name="span-corruption",
        target="llmtune.tasks.span_corruption:SpanCorruption",
        commands=("pretrain",),
        description="T5 span corruption: sentinel-marked spans to reconstruct.",
        section="span_corruption",
        options=SpanCorruptionSpec,
        columns=(TEXT,),
        metrics=(Metric("eval/loss", False), Metric("eval/token_accuracy", True), Metric("eval/target_tokens", None)),
    ),
    TaskEntry(
        name="sequence-classification",
        target="llmtune.tasks.sequence_classification:SequenceClassification",
        commands=("finetune",),
        description="One label (or a score) per text or text pair.",
        section="classification",
        options=ClassificationSpec,
        columns=(
            TEXT,
            Column(
                "text_pair_column", None, "sequence-classification: the second text of a pair.", "optional", text=True
            ),
            Column(
                "label_column",
                "label",
                "sequence-classification labels: ints, strings or floats.",
                "labels",
                cells="scalar",
            ),
        ),
        metrics=(
            Metric("eval/loss", False),
            Metric("eval/accuracy", True),
            Metric("eval/macro_f1", True),
            Metric("eval/matthews", True),
            Metric("eval/pearson", True),
            Metric("eval/spearman", True),
            Metric("eval/mse", False),
        ),
        select=_classification_metrics,
        predicts=True,
        scored_pairs=True,
    ),
    TaskEntry(
        name="token-classification",
        target="llmtune.tasks.token_classification:TokenClassification",
        commands=("finetune",),
        description="A tag per word (NER), scored by entities.",
        section="token_classification",
        options=TokenClassificationSpec,
        columns=(
            Column(
                "tokens_column",
                "tokens",
                "token-classification: the list of words of each example.",
                text=True,
                cells="list",
            ),
            Column(
                "tags_column",
                "ner_tags",
                "token-classification: the list of word tags (str or int).",
                "labels",
                cells="list",
            ),
        ),
        metrics=(
            Metric("eval/loss", False),
            Metric("eval/precision", True),
            Metric("eval/recall", True),
            Metric("eval/f1", True),
            Metric("eval/accuracy", True),
            Metric("eval/f1_*", True),  # per entity type: eval/f1_PER, eval/f1_LOC, ...
        ),
        predicts=True,
        scored_pairs=True,
    ),
    TaskEntry(
        name="relation-classification",
        target="llmtune.tasks.relation:RelationClassification",
        commands=("finetune",),
        description="The relation between two marked entities of a sentence (SemEval-2010 Task 8, TACRED).",
        section="relation",
        options=RelationSpec,
        columns=(
            Column(
                "text_column",
                "text",
                "The text (LM tasks; the first text of sequence-classification; relation-classification: the "
                "sentence, with inline <e1>..</e1> <e2>..</e2> markers unless span columns are set).",
                text=True,
            ),
            Column(
                "label_column",
                "label",
                "sequence-classification labels: ints, strings or floats (relation-classification: the relation).",
                "labels",
                cells="scalar",
            ),
            Column(
                "e1_span_column",
                None,
                "relation-classification: [start, end) character offsets of entity 1 in a text without markers.",
                "optional",
                cells="list",
            ),
            Column(
                "e2_span_column",
                None,
                "relation-classification: [start, end) character offsets of entity 2 in a text without markers.",
                "optional",
                cells="list",
            ),
        ),
        metrics=(
            *(Metric(name, name != "eval/loss") for name in RELATION_METRICS),
            Metric("eval/f1_*", True),  # per relation label, with relation.per_relation
        ),
        select=_relation_metrics,
        check=_check_relation_columns,
        predicts=True,
    ),
    TaskEntry(
        name="question-answering",
        target="llmtune.tasks.question_answering:QuestionAnswering",
        commands=("finetune",),
        description="Extractive QA: the answer is a span of the context (SQuAD).",
        section="question_answering",
        options=QuestionAnsweringSpec,
        columns=(
            Column("question_column", "question", "question-answering: the question.", text=True),
            Column("context_column", "context", "question-answering: the context the answer is taken from.", text=True),
            Column(
                "answers_column",
                "answers",
                "question-answering: {text: [...], answer_start: [...]}.",
                "labels",
                cells="any",
            ),
            Column(
                "id_column",
                "id",
                "question-answering: the example id (made up when absent).",
                "optional",
                cells="scalar",
            ),
        ),
        metrics=(Metric("eval/loss", False), Metric("eval/exact_match", True), Metric("eval/f1", True)),
        predicts=True,
        scored_pairs=True,
    ),
    TaskEntry(
        name="seq2seq",
        target="llmtune.tasks.seq2seq:Seq2Seq",
        commands=("finetune",),
        description="Translation and summarisation with an encoder-decoder.",
        section="seq2seq",
        options=Seq2SeqSpec,
        columns=(
            Column("source_column", "source", "seq2seq source text (a.b reads field b of column a).", text=True),
            Column(
                "target_column", "target", "seq2seq target text (a.b reads field b of column a).", "labels", text=True
            ),
        ),
        metrics=(
            Metric("eval/loss", False),
            Metric("eval/gen_len", None),
            Metric("eval/bleu", True),
            Metric("eval/chrf", True),
            *(Metric(f"eval/{kind}", True) for kind in ROUGE_KINDS),
        ),
        select=_seq2seq_metrics,
        predicts=True,
        scored_pairs=True,
    ),
)


def recipe_tasks() -> tuple[str, ...]:
    """The values a recipe's `task:` may take, in registry order."""
    return tuple(dict.fromkeys(entry.recipe_task for entry in TASKS))


def task_entry(task: str, data: Any = None) -> TaskEntry:
    """The entry a recipe's `task:` selects: a variant when `data` sets one of its keys, else the base task."""
    candidates = [e for e in TASKS if e.recipe_task == task]
    if not candidates:
        raise KeyError(task)
    for entry in candidates:
        if data is not None and any(getattr(data, key, None) is not None for key in entry.selected_by):
            return entry
    return next(e for e in candidates if not e.selected_by)


def commands_of(task: str) -> tuple[Command, ...]:
    """The commands that train a recipe `task:` value (its base entry's)."""
    return task_entry(task).commands


def all_columns() -> dict[str, Column]:
    """Every `data.*_column` key any task declares (a key two tasks share is declared alike)."""
    found: dict[str, Column] = {}
    for entry in TASKS:
        for column in entry.columns:
            known = found.setdefault(column.key, column)
            if known.default != column.default:
                raise AssertionError(f"data.{column.key} is declared with two defaults")
    return found


def option_sections() -> dict[str, tuple[TaskEntry, type[Section]]]:
    """Recipe section key -> (the entry it belongs to, its class)."""
    return {e.section: (e, e.options) for e in TASKS if e.section is not None and e.options is not None}
