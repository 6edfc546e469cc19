"""Classification by prompting a decoder: a prompt template and one label word per label, scored by the
label words' next-token logits after the prompt.

`PromptClassifier` wraps a causal LM so that it looks like a sequence classifier to the rest of
HeadLab: `model(input_ids, attention_mask).logits` is (B, labels), the LM-head logits of each label
word's first token at the last real token of each row. Accuracy, macro-F1, the gates' live figures,
relevance of the explained logit and the prompt's label cross-entropy in training then need nothing
decoder-specific. `PromptTokenizer` formats each text through the template (and the model's chat
template, when it has one) before tokenizing, so `core.batching.encode` needs nothing either.

Rows are padded on the right; a causal model never attends to later positions, so the padding
cannot change the logits at a row's last real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from core.errors import ModelError

# Answer words for label names that are not themselves the natural answer (Rotten Tomatoes' labels).
ANSWER_WORDS = {"fresh": "positive", "rotten": "negative", "pos": "positive", "neg": "negative"}
DEFAULT_TEMPLATE = ("Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"
                    "Review: {text}")


@dataclass(frozen=True)
class PromptSpec:
    """A prompt: `template` holds `{text}`; `label_words[i]` is the answer that means label i."""

    label_words: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    chat: bool = True  # wrap the prompt in the tokenizer's chat template as a user turn, when it has one

    def __post_init__(self) -> None:
        if "{text}" not in self.template:
            raise ValueError("The prompt template must contain {text} where the example goes.")
        if len(self.label_words) < 2 or any(not w.strip() for w in self.label_words):
            raise ValueError("Give one non-empty label word per label (at least two).")

    @classmethod
    def for_labels(cls, label_names: list[str], **kwargs) -> PromptSpec:
        """Label words = the label names in lower case, through `ANSWER_WORDS` (Rotten Tomatoes' "fresh" and
        "rotten" are answered "positive" and "negative")."""
        words = (str(n).strip().lower() for n in label_names)
        return cls(label_words=tuple(ANSWER_WORDS.get(w, w) for w in words), **kwargs)

    def to_dict(self) -> dict:
        return {"template": self.template, "label_words": list(self.label_words), "chat": self.chat}

    @classmethod
    def from_dict(cls, data: dict) -> PromptSpec:
        return cls(label_words=tuple(data["label_words"]), template=data["template"], chat=bool(data["chat"]))


class PromptTokenizer:
    """A tokenizer that formats texts as prompts first; every other attribute is the wrapped tokenizer's.

    `tokenizer(texts, ...)` returns the ids of `spec.template` filled with each text (inside the chat
    template as a user turn followed by the assistant's turn opening, when `spec.chat` and the tokenizer
    has one; else the filled template followed by "\\nAnswer:"). The chat template already holds the
    special tokens, so none are added.
    """

    def __init__(self, tokenizer, spec: PromptSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        self.uses_chat = bool(spec.chat and getattr(tokenizer, "chat_template", None))

    def format(self, text: str) -> str:
        """The prompt string for one example."""
        filled = self.spec.template.replace("{text}", text)
        if self.uses_chat:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": filled}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"{filled}\nAnswer:"

    def __call__(self, texts, *args, add_special_tokens: bool = True, **kwargs):
        prompts = [self.format(t) for t in ([texts] if isinstance(texts, str) else texts)]
        return self.tokenizer(prompts[0] if isinstance(texts, str) else prompts, *args,
                              add_special_tokens=add_special_tokens and not self.uses_chat, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def label_token_ids(self) -> list[int]:
        """The first token of each label word as the answer's first token (a leading space when the
        answer follows "Answer:" on the same line). ModelError if two labels share it."""
        prefix = "" if self.uses_chat else " "
        ids = [self.tokenizer(prefix + w, add_special_tokens=False)["input_ids"][0] for w in self.spec.label_words]
        if len(set(ids)) < len(ids):
            raise ModelError(f"The label words {', '.join(self.spec.label_words)} start with the same token; "
                             "choose words that differ in their first token.")
        return ids


class PromptClassifier(nn.Module):
    """A causal LM read as a classifier: logits (B, labels) of the label words after each prompt.

    `lm` is a `*ForCausalLM`; `label_ids` (labels,) the label words' first tokens. `config` is the
    LM's config (its `num_labels`/`id2label` set to the labels), `base_model` the LM's decoder
    stack, so the adapter and everything reading `model.config` work unchanged. Extra keyword
    arguments (`output_attentions`, `output_hidden_states`) go to the decoder stack and come back on
    the output.
    """

    def __init__(self, lm: nn.Module, label_ids: list[int], label_names: list[str]):
        super().__init__()
        self.lm = lm
        self.register_buffer("label_ids", torch.tensor(label_ids, dtype=torch.long), persistent=False)
        lm.config.num_labels = len(label_names)
        lm.config.id2label = dict(enumerate(label_names))
        lm.config.label2id = {n: i for i, n in enumerate(label_names)}
        self.train(lm.training)  # an LM in eval mode gives a classifier in eval mode

    @property
    def config(self):
        return self.lm.config

    @property
    def base_model(self) -> nn.Module:
        return self.lm.base_model

    @property
    def headlab_pruning(self):
        return getattr(self.lm, "headlab_pruning", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> SequenceClassifierOutput:
        """input_ids, attention_mask (B, T), right-padded -> logits (B, labels)."""
        out = self.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
        hidden = out.last_hidden_state  # (B, T, d)
        last = (attention_mask.sum(dim=1) - 1 if attention_mask is not None
                else torch.full((hidden.shape[0],), hidden.shape[1] - 1, device=hidden.device))
        final = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, d)
        logits = self.lm.lm_head(final)[:, self.label_ids]  # (B, labels)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return SequenceClassifierOutput(logits=logits, hidden_states=out.hidden_states, attentions=out.attentions)


def prompt_classifier(lm: nn.Module, tokenizer, label_names: list[str],
                      spec: PromptSpec | None = None) -> tuple[PromptClassifier, PromptTokenizer]:
    """The classifier and tokenizer of causal LM `lm` prompted with `spec` (default: the label names as
    label words and `DEFAULT_TEMPLATE`)."""
    spec = spec or PromptSpec.for_labels(label_names)
    if len(spec.label_words) != len(label_names):
        raise ModelError(f"The prompt has {len(spec.label_words)} label words for {len(label_names)} labels "
                         f"({', '.join(label_names)}); give one word per label.")
    prompts = PromptTokenizer(tokenizer, spec)
    return PromptClassifier(lm, prompts.label_token_ids(), label_names), prompts
