"""`data.format: semeval2010`: the SemEval-2010 Task 8 release files read as they are.

Each example is `ID<TAB>"sentence with <e1>..</e1> and <e2>..</e2>"`, then its label line (`Cause-Effect(e2,e1)`,
`Other`), then a `Comment:` line, then a blank line; the release has CRLF line endings. The unlabelled test file
(`TEST_FILE.txt`) has only the numbered sentence lines: such a file gives rows without a label column, which
`llmtune predict` takes. Rows: the sentence (markers kept, quotes removed) in `data.text_column`, the label in
`data.label_column` and the release's number in `id`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmtune.errors import UserError

if TYPE_CHECKING:
    from datasets import Dataset

SENTENCE = re.compile(r'^(\d+)\t"(.*)"$')
ID_COLUMN = "id"


def parse_semeval2010(path: str) -> list[dict[str, Any]]:
    """The examples of one release file: {id, text, label (None in an unlabelled file), line}."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()  # CRLF or LF
    examples: list[dict[str, Any]] = []
    number = 0
    while number < len(lines):
        line = lines[number]
        if not line.strip():
            number += 1
            continue
        match = SENTENCE.match(line)
        if match is None:
            raise UserError(
                f'{path}, line {number + 1}: expected a numbered sentence (ID<TAB>"sentence"), got {line[:60]!r}; '
                "is this a SemEval-2010 Task 8 file (data.format: semeval2010)?"
            )
        example = {"id": int(match.group(1)), "text": match.group(2), "label": None, "line": number + 1}
        following = lines[number + 1] if number + 1 < len(lines) else ""
        if following.strip() and not SENTENCE.match(following):  # a labelled example: label, comment
            label = following.strip()
            comment = lines[number + 2] if number + 2 < len(lines) else ""
            if not comment.startswith("Comment"):
                raise UserError(
                    f"{path}, line {number + 3}: expected the 'Comment:' line after label {label!r} of sentence "
                    f"{example['id']}, got {comment[:60]!r}"
                )
            example["label"] = label
            number += 3
        else:
            number += 1
        examples.append(example)
    if not examples:
        raise UserError(f"{path}: no sentences; a SemEval-2010 Task 8 file has numbered sentences")
    labelled = {e["label"] is not None for e in examples}
    if len(labelled) > 1:
        first = next(e for e in examples if e["label"] is None)
        raise UserError(
            f"{path}, line {first['line']}: sentence {first['id']} has no label line but others have one; "
            "label every sentence or none"
        )
    return examples


def read_semeval2010(paths: list[str], text_column: str, label_column: str) -> Dataset:
    """The rows of one split's release files (see the module docstring)."""
    from datasets import Dataset

    examples = [e for p in paths for e in parse_semeval2010(p)]
    columns: dict[str, list[Any]] = {ID_COLUMN: [e["id"] for e in examples], text_column: [e["text"] for e in examples]}
    if examples[0]["label"] is not None:
        columns[label_column] = [e["label"] for e in examples]
    return Dataset.from_dict(columns)
