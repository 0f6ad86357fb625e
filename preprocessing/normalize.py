"""Text normalization before tokenizing (the prepare stage and tokenizer training)."""

from __future__ import annotations

import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def normalize(text: str) -> str:
    """Unicode NFC, control characters removed (newlines and tabs kept)."""
    return _CONTROL.sub("", unicodedata.normalize("NFC", text))
