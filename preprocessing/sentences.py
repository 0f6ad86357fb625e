"""An offline rule-based sentence splitter (no NLTK data, no downloads).

A boundary is sentence-final punctuation (``.``, ``!``, ``?``, optionally followed by
closing quotes or brackets), then whitespace, then something that can start a sentence
(an upper-case letter, a digit, an opening quote or bracket). A period does not end a
sentence after a known abbreviation ("e.g.", "Dr.", "Fig.") or a single initial
("J. Smith"). Blank lines always separate sentences.
"""

from __future__ import annotations

import re

_ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st vs etc e.g i.e cf al fig figs eq eqs no nos vol vols pp ch sec
inc ltd co corp dept est approx jan feb mar apr jun jul aug sep sept oct nov dec mt ft
""".split())
_BOUNDARY = re.compile(r"""([.!?]+["')\]]*)\s+(?=["'(\[]?[A-Z0-9])""")
_BLANK = re.compile(r"\n\s*\n")


def _ends_with_abbreviation(chunk: str) -> bool:
    last = chunk.rsplit(None, 1)[-1] if chunk.strip() else ""
    word = last.rstrip(".").lstrip("\"'([").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (stripped, non-empty), in order."""
    out = []
    for block in _BLANK.split(text):
        start, pending = 0, ""
        for m in _BOUNDARY.finditer(block):
            piece = block[start:m.end(1)]
            start = m.end()
            if m.group(1).startswith(".") and len(m.group(1).rstrip("\"')]")) == 1 \
                    and _ends_with_abbreviation(piece):
                pending += piece + " "
                continue
            sentence = (pending + piece).strip()
            pending = ""
            if sentence:
                out.append(" ".join(sentence.split()))
        tail = (pending + block[start:]).strip()
        if tail:
            out.append(" ".join(tail.split()))
    return out
