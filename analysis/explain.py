""""Why this prediction": the prediction for one sentence and its token-level LRP relevance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from analysis.relevance import token_relevance
from core.models import LoadedModel


@dataclass
class Explanation:
    tokens: list[str]  # T word pieces, specials included
    relevance: np.ndarray  # (T,) conservative LRP relevance per token, in logit units
    bias: float  # the biases' share of the logit: relevance.sum() + bias == logit
    predicted: str
    confidence: float  # softmax probability of the predicted class
    explained: str  # class whose logit is explained
    logit: float
    truncated: bool  # the sentence was cut to the model's maximum length


def explain_prediction(loaded: LoadedModel, text: str, target: int | None = None) -> Explanation:
    """Predict `text` and attribute the `target` logit (default: the predicted class) to its tokens."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("The 'text' parameter of explain_prediction() is empty.")
    enc = loaded.tokenizer(text, truncation=True, max_length=loaded.max_length, return_tensors="pt")
    with torch.inference_mode():
        probs = torch.softmax(loaded.model(**enc).logits[0], -1)
    predicted = int(probs.argmax())
    why = token_relevance(loaded, text, target=predicted if target is None else target)
    full = len(loaded.tokenizer(text)["input_ids"])
    return Explanation(why.tokens, why.relevance, why.bias, loaded.label_names[predicted], float(probs[predicted]),
                       loaded.label_names[why.target], why.logit, full > loaded.max_length)
