"""Raw dataset loading: a hub dataset, local files (text, json/jsonl, csv, parquet) or a built-in corpus.

The result always has the splits the caller asks for; a validation split is carved off the training
split reproducibly (`data.split_seed`) when the source has none. Files are checked before a library reads
them (JSON lines and CSV rows, with line numbers), and every column the task reads is checked for missing
values and for the kind of value it must hold. Every problem is a one-line `UserError` naming the file,
split, row or column; blank text documents, which pretraining can safely skip, are skipped and counted.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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
_TEXTUAL = {"text", "json", "csv", "tsv", "conll", "squad", "parallel", "semeval2010"}


@dataclass
class RawData:
    """Raw splits by name, a fingerprint that changes whenever their content may have changed, and what
    loading counted (examples skipped as blank, how text files were split into examples)."""

    splits: dict[str, Dataset]
    fingerprint: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Required:
    """A column every split must have, and what its cells must hold.

    `cells`: text (a string), scalar (a string or number: labels), list (a list: words, tags, messages) or
    any. `blank`: a null or whitespace-only cell is an error naming its row, or (pretraining text) skipped
    and counted, or allowed (an optional template field).
    """

    key: str  # the recipe key naming the column, e.g. data.label_column
    column: str  # the column; `a.b` reads field b of column a (only `a` is checked here)
    cells: Literal["text", "scalar", "list", "any"] = "any"
    blank: Literal["error", "skip", "allow"] = "error"


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
    if fmt == "semeval2010":
        from llmtune.semeval_format import read_semeval2010

        return read_semeval2010(paths, spec.text_column, spec.label_column), json.dumps(stamp)
    kwargs: dict[str, Any] = {}
    if fmt == "text":
        kwargs["sample_by"] = _sample_by(paths, spec)
    elif fmt == "json":
        for p in paths:
            _check_json(Path(p))
    elif fmt in ("csv", "tsv"):
        # tsv is GLUE-style: tab-separated, a header row, quotes are text (csv.QUOTE_NONE)
        kwargs = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
        for p in paths:
            _check_rows(Path(p), kwargs.get("delimiter", ","), kwargs.get("quoting", csv.QUOTE_MINIMAL))
        fmt = "csv"
    try:
        ds = load_dataset(fmt, data_files={split: paths}, split=split, **kwargs)
    except Exception as exc:  # the builders raise many types; the user needs the file and the reason
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"data.files.{split}: cannot read {paths[0]!r} as {fmt}: {first}") from None
    return ds, json.dumps([stamp, kwargs.get("sample_by")])


def _sample_by(paths: list[str], spec: DataSpec) -> str:
    """How the text loader cuts these files into examples: data.sample_by, or for `auto` paragraphs when a
    file has a blank line and lines otherwise (one sentence or document per line, as `run_clm` reads text)."""
    if spec.sample_by != "auto":
        return spec.sample_by
    for p in paths:
        with Path(p).open(encoding="utf-8") as fh:
            previous_blank = False
            for number, line in enumerate(fh):
                blank = not line.strip()
                if blank and number > 0 and not previous_blank:
                    return "paragraph"
                previous_blank = blank
    return "line"


def _check_json(path: Path) -> None:
    """A .json file holds one JSON document or JSON lines; refuse anything else with its line number."""
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return
    except json.JSONDecodeError as whole:
        first_error = whole
    lines = text.splitlines()
    if not text.strip():
        raise UserError(f"{path}: only blank lines, no JSON rows; give it some rows or remove it")
    if len([line for line in lines if line.strip()]) < 2:  # one document, broken
        raise UserError(
            f"{path}, line {first_error.lineno}: not valid JSON ({first_error.msg}); fix the file or its extension"
        )
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}, line {number}: not valid JSON ({exc.msg} at column {exc.colno}); a JSON-lines file "
                "holds one JSON object per line"
            ) from None
        if not isinstance(row, dict):
            raise UserError(
                f"{path}, line {number}: a JSON-lines row must be an object {{column: value}}, got {type(row).__name__}"
            )


def _check_rows(path: Path, delimiter: str, quoting: int) -> None:
    """Every CSV/TSV row has as many fields as the header (pandas fills short rows with nulls silently)."""
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            return
        rows = 0
        for row in reader:
            if row and len(row) != len(header):
                name = "TSV" if delimiter == "\t" else "CSV"
                fields = f"{len(row)} field{'s' if len(row) != 1 else ''}"
                raise UserError(
                    f"{path}, line {reader.line_num}: {fields} but the header has {len(header)} "
                    f"({', '.join(header)}); every {name} row needs one value per column"
                    + (" (quote values that contain a comma)" if delimiter == "," else "")
                )
            rows += bool(row)
        if not rows:
            raise UserError(f"{path}: only a header row ({', '.join(header)}), no data rows; give it some rows")


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
    spec: DataSpec, splits: tuple[str, ...] = ("train", "validation"), columns: list[Required] | None = None
) -> RawData:
    """Load the `train` and/or `validation` splits the spec describes (names mapped via train_split etc.).

    `columns` are what every split must have (default: data.text_column, blank documents skipped); a
    dotted name `a.b` needs column `a`. Blank cells of a skippable column are dropped (and counted) before
    a validation split is carved off.
    """
    if columns is None:
        columns = [Required("data.text_column", spec.text_column, "text", "skip")]
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
    if "validation" in splits and "validation" not in loaded and "train" not in loaded:
        raise UserError(f"data: the source has no '{spec.validation_split}' split to evaluate on")
    stats: dict[str, Any] = {}
    for role, ds in list(loaded.items()):
        loaded[role], skipped = _checked(ds, role, columns)
        if skipped:
            stats[f"{role}_skipped_blank"] = skipped
        if len(loaded[role]) == 0:
            raise UserError(f"data: every document of the {role} split is blank ({skipped} skipped); give it some text")
    if "validation" in splits and "validation" not in loaded:
        loaded["train"], loaded["validation"] = _carve(loaded["train"], spec)
        prints.append(f"carved={spec.validation_fraction}/{spec.split_seed}")
    for role, ds in loaded.items():
        if len(ds) == 0:
            raise UserError(f"data: the {role} split is empty; give it some rows")
    result = {role: loaded[role] for role in splits}
    digest = hashlib.sha256("|".join([*(c.column for c in columns), *prints]).encode()).hexdigest()[:16]
    return RawData(result, digest, stats)


def _carve(train: Dataset, spec: DataSpec) -> tuple[Dataset, Dataset]:
    """A reproducible validation split off the training split; refuse one too small to split."""
    held_out = math.ceil(spec.validation_fraction * len(train))
    if len(train) < 2 or held_out >= len(train):
        unit = f"examples (text files read by {spec.sample_by})" if spec.files is not None else "examples"
        raise UserError(
            f"data: the train split has {len(train)} {unit}, too few to carve off a validation split; "
            "give one in data.files.validation, or set data.sample_by: line for a file of one-sentence lines"
        )
    carved = train.train_test_split(test_size=spec.validation_fraction, seed=spec.split_seed)
    return carved["train"], carved["test"]


_KINDS = {"text": "text", "scalar": "a label (a string or a number)", "list": "a list", "any": "a value"}
_A_KIND = {"text": "text", "number": "a number", "list": "a list", "mapping": "a mapping"}


def _cell_kind(arrow_type: Any) -> str:
    import pyarrow as pa

    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "text"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type) or pa.types.is_boolean(arrow_type):
        return "number"
    if pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type):
        return "list"
    if pa.types.is_struct(arrow_type):
        return "mapping"
    if pa.types.is_null(arrow_type):
        return "null"
    if getattr(arrow_type, "extension_name", None) == "arrow.json":
        return "json"
    return str(arrow_type)


def _value_kind(value: Any) -> str:
    """The kind of one decoded JSON value, named as `_cell_kind` names column types."""
    if value is None:
        return "null"
    if isinstance(value, str):
        return "text"
    if isinstance(value, (bool, int, float)):
        return "number"
    return "list" if isinstance(value, list) else "mapping"


def _fits(cells: str, kind: str) -> bool:
    return {"text": kind == "text", "scalar": kind in ("text", "number"), "list": kind == "list"}.get(cells, True)


def _json_blank(need: Required, role: str, column: Any) -> Any:
    """A column of JSON values of several kinds (datasets stores those as JSON text): refuse the first cell of
    the wrong kind by its row, labels that mix text and numbers, and nulls inside lists; the mask of its null
    and whitespace-only cells."""
    import pyarrow as pa

    values = [None if cell is None else json.loads(cell) for cell in column.to_pylist()]
    seen: dict[str, int] = {}  # kind -> the first row holding one
    for row, value in enumerate(values):
        kind = _value_kind(value)
        if kind == "null":
            continue
        if not _fits(need.cells, kind):
            raise UserError(
                f"{need.key}: column {need.column!r} holds {_A_KIND[kind]} in row {row} of the {role} split, not "
                f"{_KINDS[need.cells]}; fix that row (and any like it) or point the key at the right column"
            )
        if need.cells == "scalar" and seen and kind not in seen:
            first_kind, first_row = next(iter(seen.items()))
            raise UserError(
                f"{need.key}: column {need.column!r} mixes labels of two kinds in the {role} split "
                f"({_A_KIND[first_kind]} in row {first_row}, {_A_KIND[kind]} in row {row}); write every label alike"
            )
        if kind == "list" and None in value:
            raise _null_item_error(need, role, row, value.index(None))
        seen.setdefault(kind, row)
    return pa.array([v is None or (isinstance(v, str) and not v.strip()) for v in values])


def _null_item_error(need: Required, role: str, row: int, position: int) -> UserError:
    return UserError(
        f"{need.key}: column {need.column!r} has a null at position {position} of the list in row {row} of the "
        f"{role} split; fill it or remove that row"
    )


def _null_item(column: Any) -> tuple[int, int] | None:
    """(row, position) of the first null inside a cell of a list column, or None."""
    import pyarrow.compute as pc

    column = column.combine_chunks()
    nulls = pc.list_flatten(column).is_null()
    if not pc.any(nulls).as_py():
        return None
    row = pc.list_parent_indices(column)[pc.indices_nonzero(nulls)[0].as_py()].as_py()
    return row, column[row].as_py().index(None)


def _checked(ds: Dataset, role: str, columns: list[Required]) -> tuple[Dataset, int]:
    """Refuse a missing column, cells of the wrong kind and (unless skippable) null or blank cells; drop the
    blank rows of skippable columns. Returns the split and how many rows were dropped."""
    import pyarrow.compute as pc

    if len(ds) == 0:
        raise UserError(f"data: the {role} split is empty; give it some rows")
    if ds._indices is not None:
        ds = ds.flatten_indices()
    skip = None
    for need in columns:
        top = need.column.split(".")[0]
        if top not in ds.column_names:
            raise UserError(
                f"{need.key}: column {need.column!r} not in the {role} split; "
                f"columns found: {', '.join(ds.column_names)}"
            )
        if "." in need.column:
            continue  # a field of a struct column: the task checks each value
        column = ds.data.column(top)
        kind = _cell_kind(column.type)
        if kind == "null":  # every cell empty: the type is not known
            raise UserError(f"{need.key}: column {need.column!r} is empty in every row of the {role} split; fill it")
        if kind == "json":  # values of several kinds (JSON lines): each cell is checked
            blank = _json_blank(need, role, column)
        elif not _fits(need.cells, kind):
            raise UserError(
                f"{need.key}: column {need.column!r} of the {role} split holds {kind} values, not "
                f"{_KINDS[need.cells]}; point the key at the right column or fix the data"
            )
        elif kind == "list" and (found := _null_item(column)) is not None:
            raise _null_item_error(need, role, *found)
        elif kind == "text":  # null, empty or whitespace only
            blank = pc.equal(pc.utf8_trim_whitespace(pc.fill_null(column, "")), "")
        else:
            blank = column.is_null()
        if need.blank == "allow" or not pc.any(blank).as_py():
            continue
        if need.blank == "skip":
            skip = blank if skip is None else pc.or_(skip, blank)
            continue
        row = pc.indices_nonzero(blank.combine_chunks() if hasattr(blank, "combine_chunks") else blank)[0].as_py()
        count = pc.sum(blank).as_py()
        raise UserError(
            f"{need.key}: column {need.column!r} has no value in row {row} of the {role} split "
            f"({count} row(s) in all); fill them or remove those rows"
        )
    if skip is None:
        return ds, 0
    keep = pc.indices_nonzero(pc.invert(skip)).to_numpy()
    return ds.select(keep), len(ds) - len(keep)
