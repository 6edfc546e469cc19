"""Text generation with a causal LM: the greedy decoding loop the decode timer runs (with or without the
KV cache), and a reply to a user's prompt (chat template, greedy or seeded sampling, bounded length).

    tokens, seconds = greedy_decode(lm, input_ids, 32)          # 32 new tokens; seconds of decoding only
    reply = generate_reply(lm, tokenizer, "What is the capital of France?", max_new_tokens=48)
    reply.text, reply.tokens_per_s
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MAX_NEW_TOKENS = 256  # longest reply `generate_reply` writes (about 8 s of SmolLM2-135M on 2 cores)
MAX_TEMPERATURE = 2.0


@dataclass(frozen=True)
class Generation:
    """A reply to one prompt (what `generate_reply` returns)."""

    prompt: str  # the user's prompt, as given
    text: str  # the new tokens decoded (special tokens dropped)
    prompt_tokens: int  # tokens of the formatted prompt (chat template included)
    new_tokens: int  # tokens generated (fewer than asked when the model ended its turn)
    stopped: bool  # the model ended its turn (an end-of-sequence token) before the limit
    seconds: float  # wall time of the whole generation, prefill included
    greedy: bool  # argmax decoding (else sampled at `temperature` with `seed`)
    temperature: float
    seed: int

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def _device(lm: torch.nn.Module) -> torch.device:
    return next(lm.parameters()).device


@torch.inference_mode()
def greedy_decode(lm, input_ids: torch.Tensor, new_tokens: int, *, use_cache: bool = True) -> tuple[list[int], float]:
    """Greedy continuation of one prompt: (`new_tokens` token ids, seconds spent decoding).

    `input_ids` (1, T). The first new token comes from the prompt's forward pass (the prefill, not timed);
    each of the other `new_tokens - 1` is one more forward pass, timed: with `use_cache` one token against
    the KV cache (`past_key_values`), without it the whole sequence again. No end-of-sequence stop: the
    length is fixed, so timings compare. Both ways give the same tokens (up to float ties).
    """
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"The 'new_tokens' parameter of greedy_decode() must be an int >= 1. Got {new_tokens!r}.")
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_decode() takes one prompt, input_ids of shape (1, T). Got {tuple(input_ids.shape)}.")
    device = _device(lm)
    ids = input_ids.to(device)
    out = lm(input_ids=ids, use_cache=use_cache, logits_to_keep=1)
    token = out.logits[:, -1].argmax(dim=-1, keepdim=True)  # (1, 1)
    past = out.past_key_values if use_cache else None
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        if use_cache:
            out = lm(input_ids=token, past_key_values=past, use_cache=True, logits_to_keep=1)
            past = out.past_key_values
        else:
            out = lm(input_ids=torch.cat([ids, *tokens], dim=1), use_cache=False, logits_to_keep=1)
        token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(token)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return [int(t) for t in torch.cat(tokens, dim=1)[0]], time.perf_counter() - start


def format_prompt(tokenizer, prompt: str, chat: bool = True) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask (1, T) of `prompt`: a user turn of the tokenizer's chat template followed
    by the assistant's turn opening (when `chat` and the tokenizer has one), else the plain text."""
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _end_tokens(lm, tokenizer) -> set[int]:
    """The token ids that end the model's turn (its generation config's and the tokenizer's)."""
    ids = getattr(lm.generation_config, "eos_token_id", None)
    return {t for t in [*(ids if isinstance(ids, list) else [ids]), tokenizer.eos_token_id] if t is not None}


def _check(prompt: str, max_new_tokens: int, temperature: float) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("The 'prompt' parameter of generate_reply() must be a non-empty text.")
    if not isinstance(max_new_tokens, int) or not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"The 'max_new_tokens' parameter of generate_reply() must be an int in [1, {MAX_NEW_TOKENS}]. "
                         f"Got {max_new_tokens!r} instead.")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"The 'temperature' parameter of generate_reply() must be in [0, {MAX_TEMPERATURE}] "
                         f"(0 = greedy). Got {temperature!r} instead.")


@torch.inference_mode()
def generate_reply(lm, tokenizer, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0,
                   seed: int = 0, chat: bool = True) -> Generation:
    """The model's reply to `prompt` (`format_prompt`), at most `max_new_tokens` (<= `MAX_NEW_TOKENS`) tokens,
    stopping at the end of its turn.

    `temperature` 0 decodes greedily; above 0 samples (transformers' `generate`, its default top-k 50)
    from the logits divided by `temperature`, with torch's random generator seeded by `seed` inside a
    forked RNG state (the same seed gives the same reply; the caller's RNG is untouched).
    ValueError for an empty prompt or a limit / temperature out of range.
    """
    _check(prompt, max_new_tokens, temperature)
    enc = {k: v.to(_device(lm)) for k, v in format_prompt(tokenizer, prompt, chat).items()}
    greedy = temperature == 0
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": float(temperature)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = lm.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    seconds = time.perf_counter() - start
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    stopped = bool(new) and new[-1] in _end_tokens(lm, tokenizer)
    return Generation(prompt=prompt, text=tokenizer.decode(new, skip_special_tokens=True).strip(),
                      prompt_tokens=int(enc["input_ids"].shape[1]), new_tokens=len(new), stopped=stopped,
                      seconds=seconds, greedy=greedy, temperature=float(temperature), seed=int(seed))
