""""Why this prediction": the prediction for one sentence and its token-level LRP relevance.

A prompted decoder explains the logit of the class's label word at the prompt's last token, so its tokens
are the whole prompt (template and chat turns included), shown as readable BPE pieces (" film", not
"Ġfilm"); `in_text` marks the ones that come from the sentence itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis.attention import readable_tokens
from analysis.relevance import token_relevance
from core.batching import collate, encode
from core.models import LoadedModel


@dataclass
class Explanation:
    tokens: list[str]  # T word pieces, specials included (a decoder's: readable pieces of the whole prompt)
    relevance: np.ndarray  # (T,) conservative LRP relevance per token, in logit units
    bias: float  # the biases' share of the logit: relevance.sum() + bias + absorbed == logit
    predicted: str
    confidence: float  # softmax probability of the predicted class
    explained: str  # class whose logit is explained
    logit: float
    truncated: bool  # the sentence was cut to the model's maximum length
    in_text: np.ndarray  # (T,) bool: the token covers characters of the sentence (not specials or the template)
    absorbed: float = 0.0  # the share AttnLRP's softmax rule absorbs (0 for "conservative")
    method: str = "conservative"


def _text_span(loaded: LoadedModel, text: str) -> tuple[int, int]:
    """[start, end) of `text` inside the string that is tokenized: the prompt for a decoder."""
    if not loaded.is_decoder:
        return 0, len(text)
    template = loaded.tokenizer.spec.template
    filled = template.replace("{text}", text)
    start = loaded.tokenizer.format(text).index(filled) + template.index("{text}")
    return start, start + len(text)


def _in_text(loaded: LoadedModel, text: str, n_tokens: int) -> np.ndarray:
    """(n_tokens,) bool over the tokens as `core.batching.encode` cut them (first n-1 and the last)."""
    offsets = [tuple(o) for o in loaded.tokenizer(text, return_offsets_mapping=True)["offset_mapping"]]
    if len(offsets) > n_tokens:
        offsets = offsets[: n_tokens - 1] + offsets[-1:]
    start, end = _text_span(loaded, text)
    return np.array([s < end and e > start and e > s for s, e in offsets], dtype=bool)


def explain_prediction(loaded: LoadedModel, text: str, target: int | None = None, *,
                       method: str = "conservative") -> Explanation:
    """Predict `text` and attribute the `target` logit (default: the predicted class) to its tokens by LRP
    `method` ("conservative" or "attnlrp", see `analysis.relevance`)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("The 'text' parameter of explain_prediction() is empty.")
    enc = encode(loaded.tokenizer, [text], loaded.max_length)  # the cut token_relevance explains
    with torch.inference_mode():
        probs = torch.softmax(loaded.model(**collate(enc.ids, 0)).logits[0], -1)
    predicted = int(probs.argmax())
    why = token_relevance(loaded, text, target=predicted if target is None else target, method=method)
    tokens = why.tokens
    if loaded.is_decoder:
        tokens = readable_tokens(loaded.text_tokenizer, loaded.text_tokenizer.convert_tokens_to_ids(why.tokens))
    return Explanation(tokens, why.relevance, why.bias, loaded.label_names[predicted], float(probs[predicted]),
                       loaded.label_names[why.target], why.logit, bool(enc.truncated),
                       _in_text(loaded, text, len(tokens)), why.absorbed, why.method)
