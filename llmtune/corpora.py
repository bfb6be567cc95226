"""Built-in corpora: text that is on every machine with Python, so the default recipes need no download."""

from __future__ import annotations

import hashlib

from llmtune.errors import UserError


def _pydoc_documents() -> list[str]:
    """CPython's `pydoc_data.topics`: the language reference's prose (PSF License), one paragraph a row."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [p.strip() for name in sorted(topics) for p in topics[name].split("\n\n") if p.strip()]


CORPORA = {
    "pydoc": (
        _pydoc_documents,
        "CPython pydoc_data.topics (~465k characters of English reference prose), PSF License",
    ),
}


def builtin_documents(name: str) -> tuple[list[str], str]:
    """The documents of a built-in corpus and a fingerprint of their content."""
    if name not in CORPORA:
        raise UserError(
            f"data.source: unknown built-in corpus 'builtin:{name}'; available: "
            + ", ".join(f"builtin:{n}" for n in CORPORA)
        )
    docs = CORPORA[name][0]()
    digest = hashlib.sha256("\x00".join(docs).encode()).hexdigest()[:16]
    return docs, digest
