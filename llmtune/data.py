"""Raw dataset loading: a hub dataset, local files (text, json/jsonl, csv, parquet) or a built-in corpus.

The result always has the splits the caller asks for; a validation split is carved off the training
split reproducibly (`data.split_seed`) when the source has none. Every problem is a one-line `UserError`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.corpora import builtin_documents
from llmtune.errors import UserError
from llmtune.recipe import BUILTIN_PREFIX, DataSpec

if TYPE_CHECKING:
    from datasets import Dataset

FILE_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".conll": "conll",
}
_TEXTUAL = {"text", "json", "csv", "tsv", "conll", "squad", "parallel"}


@dataclass
class RawData:
    """Raw splits by name, and a fingerprint that changes whenever their content may have changed."""

    splits: dict[str, Dataset]
    fingerprint: str


def _check_utf8(path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise UserError(
                    f"{path}: not UTF-8 text (invalid byte at offset {offset + exc.start}); "
                    "convert it, e.g. iconv -f latin1 -t utf-8"
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (truncated character at the end)") from None


def _read_conll(paths: list[str], spec: DataSpec) -> Dataset:
    """CoNLL columns: one token per line (word first, tag last), a blank line between sentences."""
    from datasets import Dataset

    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    for p in paths:
        words: list[str] = []
        labels: list[str] = []
        for number, line in enumerate(Path(p).read_text(encoding="utf-8").splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0] == "-DOCSTART-":
                if words:
                    tokens.append(words)
                    tags.append(labels)
                words, labels = [], []
                continue
            if len(fields) < 2:
                raise UserError(f"{p}, line {number}: a CoNLL line needs a word and a tag, got {line.strip()!r}")
            words.append(fields[0])
            labels.append(fields[-1])
        if words:
            tokens.append(words)
            tags.append(labels)
    return Dataset.from_dict({spec.tokens_column: tokens, spec.tags_column: tags})


def _read_squad(paths: list[str], spec: DataSpec) -> Dataset:
    """SQuAD json (data -> paragraphs -> qas) flattened to one row per question."""
    from datasets import Dataset

    rows: dict[str, list[Any]] = {spec.id_column: [], spec.context_column: [], spec.question_column: []}
    rows[spec.answers_column] = []
    for p in paths:
        try:
            articles = json.loads(Path(p).read_text(encoding="utf-8"))["data"]
            for article in articles:
                for paragraph in article["paragraphs"]:
                    for qa in paragraph["qas"]:
                        rows[spec.id_column].append(str(qa["id"]))
                        rows[spec.context_column].append(paragraph["context"])
                        rows[spec.question_column].append(qa["question"])
                        answers = qa.get("answers", [])
                        rows[spec.answers_column].append(
                            {"text": [a["text"] for a in answers], "answer_start": [a["answer_start"] for a in answers]}
                        )
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise UserError(
                f"{p}: not SQuAD json ({type(exc).__name__}: {exc}); expected data -> paragraphs -> "
                "{context, qas: [{id, question, answers}]}"
            ) from None
    return Dataset.from_dict(rows)


def _read_parallel(split: str, paths: list[str], spec: DataSpec) -> Dataset:
    """Two line-aligned text files: line i of the first is the source of line i of the second."""
    from datasets import Dataset

    if len(paths) != 2:
        raise UserError(
            f"data.files.{split}: format parallel takes [source_file, target_file], got {len(paths)} file(s)"
        )
    sides = [Path(p).read_text(encoding="utf-8").splitlines() for p in paths]
    if len(sides[0]) != len(sides[1]):
        raise UserError(
            f"data.files.{split}: {paths[0]} has {len(sides[0])} lines but {paths[1]} has {len(sides[1])}; "
            "parallel files must be line-aligned"
        )
    return Dataset.from_dict({spec.source_column: sides[0], spec.target_column: sides[1]})


def _load_files(split: str, paths: list[str], spec: DataSpec) -> tuple[Dataset, str]:
    from datasets import load_dataset

    declared = spec.format

    formats = set()
    stamp = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise UserError(f"data.files.{split}: file {p!r} does not exist")
        fmt = declared or FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise UserError(
                f"data.files.{split}: {p!r} has an unknown extension; use one of "
                + ", ".join(sorted(FILE_FORMATS))
                + " or set data.format"
            )
        if fmt in _TEXTUAL:
            _check_utf8(path)
        formats.add(fmt)
        st = path.stat()
        stamp.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    if all(row[1] == 0 for row in stamp):
        raise UserError(f"data: the {split} split is empty ({paths[0]!r} has no bytes); give it some rows")
    if len(formats) > 1:
        raise UserError(f"data.files.{split}: mixes file formats {sorted(formats)}; use one format per split")
    fmt = formats.pop()
    if fmt == "conll":
        return _read_conll(paths, spec), json.dumps(stamp)
    if fmt == "squad":
        return _read_squad(paths, spec), json.dumps(stamp)
    if fmt == "parallel":
        return _read_parallel(split, paths, spec), json.dumps(stamp)
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if fmt == "text" else {}
    if fmt == "tsv":  # GLUE-style: tab-separated, a header row, quotes are text (csv.QUOTE_NONE)
        fmt, kwargs = "csv", {"delimiter": "\t", "quoting": 3}
    try:
        ds = load_dataset(fmt, data_files={split: paths}, split=split, **kwargs)
    except Exception as exc:  # the builders raise many types; the user needs the file and the reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data.files.{split}: cannot read {paths[0]!r} as {fmt}: {first}") from None
    return ds, json.dumps(stamp)


def _load_hub(spec: DataSpec, split: str) -> tuple[Dataset, str]:
    from datasets import load_dataset

    try:
        ds = load_dataset(spec.hub, spec.hub_config, split=split, revision=spec.revision)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise KeyError(split) from None
        raise UserError(f"data.hub: cannot load {spec.hub!r}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise UserError(
            f"data.hub: cannot load {spec.hub!r} (config {spec.hub_config!r}): {str(exc).splitlines()[0]}; "
            "check the name and your connection, or use data.files"
        ) from None
    return ds, ds._fingerprint


def _load_split(spec: DataSpec, split: str) -> tuple[Dataset, str] | None:
    """One named split and its fingerprint, or None when the source has no such split."""
    from datasets import Dataset

    if spec.source is not None:
        if split != spec.train_split:
            return None
        docs, digest = builtin_documents(spec.source.removeprefix(BUILTIN_PREFIX))
        return Dataset.from_dict({spec.text_column: docs}), digest
    if spec.files is not None:
        paths = spec.files.get(split)
        if paths is None:
            return None
        return _load_files(split, [paths] if isinstance(paths, str) else list(paths), spec)
    try:
        return _load_hub(spec, split)
    except KeyError:
        return None


def load_raw(
    spec: DataSpec, splits: tuple[str, ...] = ("train", "validation"), columns: dict[str, str] | None = None
) -> RawData:
    """Load the `train` and/or `validation` splits the spec describes (names mapped via train_split etc.).

    `columns` maps recipe keys to the columns every split must have (default: data.text_column); a
    dotted name `a.b` needs column `a`.
    """
    if columns is None:
        columns = {"data.text_column": spec.text_column}
    names = {"train": spec.train_split, "validation": spec.validation_split}
    loaded: dict[str, Dataset] = {}
    prints: list[str] = []
    for role in ("train", "validation"):
        if role in splits or (role == "train" and "validation" in splits):
            got = _load_split(spec, names[role])
            if got is not None:
                loaded[role], fp = got
                prints.append(f"{role}={fp}")
    if "train" in splits and "train" not in loaded:
        raise UserError(f"data: the source has no '{spec.train_split}' split; set data.train_split or data.files.train")
    if "validation" in splits and "validation" not in loaded:
        if "train" not in loaded:
            raise UserError(f"data: the source has no '{spec.validation_split}' split to evaluate on")
        carved = loaded["train"].train_test_split(test_size=spec.validation_fraction, seed=spec.split_seed)
        loaded["train"], loaded["validation"] = carved["train"], carved["test"]
        prints.append(f"carved={spec.validation_fraction}/{spec.split_seed}")
    for role, ds in loaded.items():
        for key, column in columns.items():
            if column.split(".")[0] not in ds.column_names:
                raise UserError(
                    f"{key}: column {column!r} not in the {role} split; columns found: {', '.join(ds.column_names)}"
                )
        if len(ds) == 0:
            raise UserError(f"data: the {role} split is empty; give it some rows")
    result = {role: loaded[role] for role in splits}
    digest = hashlib.sha256("|".join([*columns.values(), *prints]).encode()).hexdigest()[:16]
    return RawData(result, digest)
