"""CAP (Xu et al., AAAI 2022; github.com/RunxinXu/ContrastivePruning): contrastive terms that keep a
pruned model's sentence representations close to those of the models it comes from.

z is the L2-normalised pooled representation (an encoder's [CLS] token, a decoder's last attended token,
of the last layer). For an anchor i of the pruned model's batch and a set of candidates A (the batch's
other examples and a bank's vectors), with positives P(i) in A:

    L_i = -(1 / |P(i)|) sum_{p in P(i)} log[ exp(z_i . z_p / tau) / sum_{a in A, a != i} exp(z_i . z_a / tau) ]

unsupervised positives: the same example as represented by another model; supervised positives: every
candidate with the same label. The loss is the mean over anchors with at least one positive, and per bank

    L_CAP = sum_banks  w_u L_unsup + w_s L_sup.

Banks here: FiC, the fine-tuned teacher's z of the batch; PrC, the pre-trained encoder's z of the batch
(when a folder is given: `cap_pretrained`); SnC, a FIFO queue of the pruned model's own z from earlier
steps (with labels). Simplified against the paper: SnC has no per-example index (the loop does not pass
example ids), so it adds negatives and supervised positives only, not the unsupervised term; the queue
replaces the paper's ~4096 sampled extras. Defaults: tau = 0.1, w_u / w_s = 0.3 / 3 (the authors'
structured setting).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pruning.options import option


def pooled(hidden: torch.Tensor, attention_mask: torch.Tensor, decoder: bool) -> torch.Tensor:
    """(B, d) L2-normalised sentence vectors of (B, T, d) `hidden`: token 0 (encoders) or the last attended
    token of each row (decoders, right padding)."""
    if decoder:
        last = attention_mask.long().sum(dim=1).clamp_min(1) - 1
        vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        vectors = hidden[:, 0]
    return F.normalize(vectors.float(), dim=-1)


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor,
                     temperature: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """The formula above for (B, d) `anchors`, (B, N) bool `positives` and (N, d) `candidates`; `keep`
    (B, N) bool: the candidates each anchor's denominator sums over (default all; the anchor itself must be
    left out). The mean over anchors with a positive, 0 when none has one."""
    logits = anchors @ candidates.T / temperature  # (B, N)
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
        positives = positives & keep
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    count = positives.sum(dim=1)
    has = count > 0
    if not has.any():
        return anchors.sum() * 0.0
    per_anchor = -log_prob.masked_fill(~positives, 0.0).sum(dim=1)[has] / count[has]
    return per_anchor.mean()


def bank_terms(z: torch.Tensor, labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
               same_example: bool, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(unsupervised, supervised) losses of the pruned model's (B, d) `z` against one bank: candidates are
    the batch's other examples (detached: the paper's memory) and the bank's (M, d) vectors; `same_example`:
    the bank's first B rows are the batch's examples in order (FiC, PrC), so row i is i's unsupervised
    positive. Labels (B,) and (M,)."""
    b = z.shape[0]
    others = ~torch.eye(b, dtype=torch.bool, device=z.device)
    candidates = torch.cat([z.detach(), bank])  # (B + M, d)
    cand_labels = torch.cat([labels, bank_labels])
    supervised = (labels[:, None] == cand_labels[None, :])
    supervised[:, :b] &= others
    # the anchor itself is a candidate (the batch block's diagonal): mask it out of the denominator
    logits_mask = torch.cat([others, torch.ones(b, bank.shape[0], dtype=torch.bool, device=z.device)], dim=1)
    unsup = torch.zeros_like(supervised)
    if same_example:
        unsup[torch.arange(b), b + torch.arange(b)] = True
    return (contrastive_loss(z, unsup, candidates, temperature, logits_mask),
            contrastive_loss(z, supervised, candidates, temperature, logits_mask))


@dataclass
class ContrastiveOptions:
    """CAP's settings, shared by the methods that offer it (`gradual`, `cofi`)."""

    contrastive: bool = option(False, "CAP (Xu et al. 2022): add the contrastive terms FiC (teacher), SnC (own "
                               "earlier representations) and PrC (pre-trained encoder, with cap_pretrained)")
    cap_temperature: float = option(0.1, "CAP's temperature tau", low=0.0, open_low=True)
    cap_unsup_weight: float = option(0.3, "CAP's weight w_u of the unsupervised terms (paper, structured: 0.3)",
                                     low=0.0)
    cap_sup_weight: float = option(3.0, "CAP's weight w_s of the supervised terms (paper, structured: 3)", low=0.0)
    cap_bank: int = option(1024, "CAP's SnC queue: earlier representations of the pruned model kept", low=1)
    cap_pretrained: str = option("", "CAP's PrC: a local folder of the pre-trained encoder (same vocabulary and "
                                 "hidden size; safetensors); empty: no PrC term")


class ContrastiveTerms:
    """The CAP terms of one method's run: the SnC queue and the PrC encoder (loaded once, frozen)."""

    def __init__(self, options: ContrastiveOptions, decoder: bool, device: torch.device):
        self.o, self.decoder = options, decoder
        self.queue = torch.zeros(0, 1, device=device)
        self.queue_labels = torch.zeros(0, dtype=torch.long, device=device)
        self.pretrained = load_pretrained(options.cap_pretrained, device) if options.cap_pretrained else None

    def __call__(self, outputs, teacher_outputs, labels: torch.Tensor, attention_mask: torch.Tensor,
                 inputs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms (cap_fic, cap_prc, cap_snc) from the last of the `hidden_states` ((B, T, d)
        each) of the pruned model's and the teacher's outputs; (B,) class labels; `inputs` the batch
        (its input_ids feed PrC). The queue takes this batch's vectors afterwards."""
        if labels.dim() != 1:
            raise ValueError("CAP's supervised terms need class labels; it does not apply to language modelling.")
        o = self.o
        z = pooled(outputs.hidden_states[-1], attention_mask, self.decoder)
        teacher = pooled(teacher_outputs.hidden_states[-1], attention_mask, self.decoder).detach()
        banks = {"cap_fic": (teacher, labels, True)}
        if self.pretrained is not None and inputs is not None:
            with torch.no_grad():
                states = self.pretrained(input_ids=inputs["input_ids"], attention_mask=attention_mask).last_hidden_state
            banks["cap_prc"] = (pooled(states, attention_mask, self.decoder), labels, True)
        if len(self.queue):
            banks["cap_snc"] = (self.queue, self.queue_labels, False)
        terms = {}
        for name, (bank, bank_labels, same) in banks.items():
            unsup, sup = bank_terms(z, labels, bank, bank_labels, same, o.cap_temperature)
            terms[name] = o.cap_unsup_weight * unsup + o.cap_sup_weight * sup
        self.queue = torch.cat([z.detach(), self.queue if len(self.queue) else z.new_zeros(0, z.shape[1])])[:o.cap_bank]
        self.queue_labels = torch.cat([labels, self.queue_labels])[:o.cap_bank]
        return terms


def load_pretrained(folder: str, device: torch.device) -> torch.nn.Module:
    """The pre-trained encoder in local `folder` (safetensors only, no remote code), frozen, eval mode."""
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                          trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cap_pretrained: {folder} is not a model folder with safetensors weights "
                         f"({' '.join(str(exc).split())[:160]}).") from exc
    return model.to(device).eval().requires_grad_(False)
