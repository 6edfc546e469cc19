"""LXT next to HeadLab's LRP on SmolLM2, in a process of its own (LXT patches transformers' Llama classes
and attention functions for the whole process, so HeadLab's pass runs first, unpatched, then LXT's).

Both explain the same logit: the next-token logit of each sentence's actual last token at the position
before it (plain text, no prompt; `analysis.lrp_pass.NextTokenLogit`). Per sentence, each side gives
relevance per token at the embedding output (T,) and per query head at the input of each layer's o_proj
(L, H), and its conservation error |logit - sum of token relevance| / |logit|; HeadLab's own check adds
the bias and absorbed shares. Prints one JSON object on stdout (the parent reads it).

`from lxt.efficient import monkey_patch` (LXT's documented entry) fails on transformers 5.23: the package's
`lxt/efficient/models/__init__.py` imports every model LXT supports, and its copy of transformers 4's
modeling_bert imports `find_pruneable_heads_and_indices` from `transformers.pytorch_utils`, which
transformers 5 removed (ImportError); next in that file, `models/vit_torch.py` needs torchvision, which
HeadLab does not install (it would pull its own torch). `import_lxt_llama` (the shim, this process only)
registers `lxt.efficient` and `lxt.efficient.models` as bare packages so that only the modules the Llama
patches need (`lxt.efficient.rules`, `patches`, `models.llama`) run, unchanged; the patch loop is
`lxt.efficient.core.monkey_patch`'s with the Llama map passed in. Second shim (`patch`): LXT's AttnLRP
attention patch replaces `modeling_llama.ALL_ATTENTION_FUNCTIONS` by a plain dict of wrapped functions, and
transformers 5's LlamaAttention calls `ALL_ATTENTION_FUNCTIONS.get_interface(...)` on it (AttributeError:
'dict' object has no attribute 'get_interface'); the same wrapped functions are put back into an
`AttentionInterface`. LXT's rules and wrapped functions are its own, unchanged.

Run: .venv-peers/bin/python -m bench.peers.lxt_child --method attnlrp|conservative [--n 16]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import torch
from transformers.modeling_utils import AttentionInterface

from analysis.lrp_pass import NextTokenLogit, lrp_pass
from core.batching import collate
from core.data import load_default_task
from core.models import LoadedModel, load_model

LXT_MAPS = {"attnlrp": "attnLRP", "conservative": "cp_LRP"}  # HeadLab's method -> lxt.efficient.models.llama map


def import_error() -> str | None:
    """Why `import lxt.efficient` fails here (the exception, one line), or None if it imports."""
    try:
        importlib.import_module("lxt.efficient")
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        return f"{type(exc).__name__}: {exc}"
    return None


def import_lxt_llama():
    """lxt.efficient.models.llama without lxt's package __init__ files (see the module docstring)."""
    spec = importlib.util.find_spec("lxt")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lxt is not installed (make peers)")
    root = Path(next(iter(spec.submodule_search_locations)))
    for name, folder in (("lxt.efficient", root / "efficient"),
                         ("lxt.efficient.models", root / "efficient" / "models")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules[name] = package
    return importlib.import_module("lxt.efficient.models.llama")


def patch(method: str) -> None:
    """Apply LXT's Llama patch map for `method` (AttnLRP or CP-LRP) to transformers' Llama module."""
    llama = import_lxt_llama() if import_error() else importlib.import_module("lxt.efficient.models.llama")
    for target, apply in getattr(llama, LXT_MAPS[method]).items():
        if not apply(target):
            raise RuntimeError(f"LXT could not patch {getattr(target, '__name__', target)}")
    module = llama.modeling_llama
    if not isinstance(module.ALL_ATTENTION_FUNCTIONS, AttentionInterface):  # see the module docstring
        registry = AttentionInterface()
        for name, function in module.ALL_ATTENTION_FUNCTIONS.items():
            registry[name] = function
        module.ALL_ATTENTION_FUNCTIONS = registry


def sentences(n: int) -> list[list[int]]:
    """Token ids (SmolLM2's text tokenizer, specials as HeadLab's plain-text relevance adds them) of n dev
    sentences of the default task, at most 48 tokens each."""
    texts = load_default_task().dev.subset(n, seed=0).texts
    return [ids[:48] for ids in load_model("smollm2").text_tokenizer(texts, add_special_tokens=True)["input_ids"]]


def headlab(loaded: LoadedModel, ids: list[int], method: str) -> dict:
    """One HeadLab LRP pass on one sentence: tokens (T,), heads (L, H), logit, bias, absorbed, seconds."""
    start = time.perf_counter()
    out = lrp_pass(loaded, collate([ids], loaded.text_tokenizer.pad_token_id or 0),
                   NextTokenLogit.of([ids], None, "bench.peers.lxt_child"), method)
    seconds = time.perf_counter() - start
    return {"tokens": out.tokens[0].tolist(), "heads": out.heads[0].tolist(), "logit": float(out.logits[0]),
            "bias": float(out.bias[0]), "absorbed": float(out.absorbed[0]), "seconds": seconds}


def lxt(loaded: LoadedModel, ids: list[int]) -> dict:
    """One LXT pass (gradient x input of the patched model, as LXT's README does it) on one sentence."""
    lm, adapter = loaded.lm, loaded.adapter
    layers = range(len(adapter.layers))
    contexts: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_module, args):
            args[0].retain_grad()
            contexts[layer] = args[0]
        return hook

    handles = [adapter.attention_output(layer).register_forward_pre_hook(keep(layer)) for layer in layers]
    start = time.perf_counter()
    try:
        x = torch.tensor([ids])
        embeds = lm.get_input_embeddings()(x).detach().requires_grad_()
        logits = lm(inputs_embeds=embeds, attention_mask=torch.ones_like(x), use_cache=False).logits
        logit = logits[0, len(ids) - 2, ids[-1]]
        logit.backward()
        tokens = (embeds * embeds.grad).sum(-1)[0]
        heads = [(contexts[layer] * contexts[layer].grad)[0].view(len(ids), adapter.num_heads(layer), -1).sum((0, 2))
                 for layer in layers]
    finally:
        for handle in handles:
            handle.remove()
    seconds = time.perf_counter() - start
    return {"tokens": tokens.tolist(), "heads": torch.stack(heads).tolist(), "logit": float(logit.detach()),
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=tuple(LXT_MAPS), required=True)
    parser.add_argument("--n", type=int, default=16, help="dev sentences")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2")
    rows = sentences(args.n)
    ours = [headlab(loaded, ids, args.method) for ids in rows]
    result: dict = {"method": args.method, "headlab": ours, "import_error": import_error()}
    try:
        patch(args.method)
        result["lxt"] = [lxt(loaded, ids) for ids in rows]
    except Exception as exc:  # noqa: BLE001 - reported in the table, the bench goes on
        result["lxt_error"] = f"{type(exc).__name__}: {exc}"
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
