"""One table cell as text: what every reader (CSV/TSV/JSONL, `datasets` formats) cleans its values with."""

from __future__ import annotations

import json
import math
from typing import Any


def cell(value: Any) -> str | None:
    """A cell as stripped text, or None when missing or blank. Integral floats (JSON 1.0) read as "1"."""
    if value is None:
        return None
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if value.is_integer():
            return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    text = str(value).strip()
    return text or None
