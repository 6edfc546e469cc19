"""Zhu & Gupta (2017, "To prune, or not to prune", arXiv 1710.01878): gradual pruning while training.

The sparsity follows the cubic schedule (`pruning.schedule.CubicSchedule`)

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3,     updated every dt steps from t0 to t0 + n dt,

training runs throughout, and what is pruned stays pruned. Two units:

    weights     (the paper) every dt steps, each Linear of every layer (Q, K, V, attention output, FFN in
                and gate, FFN out) masks its s_t fraction of smallest |w| (masked weights count as
                smallest, so masks only grow); after every optimizer step the masked weights are zeroed
                again. The masks stay through the fine-tune and the export: the model keeps its dense
                shape and its dense CPU speed (the run record states the size in a sparse format).
    heads-ffn   (structured) s_t is a fraction of the encoder's weights removed as heads and FFN units,
                the same keep fraction in every layer (at least one head and one unit each); heads ranked
                by `score` -- magnitude (||W_V,h|| ||W_O,h||, on the current weights), importance (Michel
                et al. 2019, |dL/dgate| on `score_examples` training examples of the current model) or
                relevance (Voita et al. 2019, LRP, the same) -- FFN units by magnitude; gated while
                training, sliced physically at the end of the gate phase.

With `contrastive` the CAP terms (`pruning.contrastive`) join the loss and the teacher distils (as in
CAP's code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from analysis.roles.survival import protect_scores
from core.loaded import LoadedModel
from pruning.contrastive import ContrastiveOptions, ContrastiveTerms
from pruning.gate_state import GateState, unit_scores
from pruning.methods.base import PruningMethod, register
from pruning.methods.oneshot import role_heads
from pruning.methods.wanda import layer_linears, refuse_lora
from pruning.options import option
from pruning.schedule import CubicSchedule
from pruning.selection import per_layer_state
from pruning.size import exact_sparsity
from pruning.sparsity_search import closest_state

UNITS = ("weights", "heads-ffn")
SCORES = ("magnitude", "importance", "relevance")


def magnitude_mask(weight: torch.Tensor, sparsity: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """0/1 mask of `weight`'s shape closing its round(sparsity * numel) smallest |w|; entries `mask` already
    closed rank below every open one (ties: lower index first)."""
    scores = weight.detach().abs().float().reshape(-1)
    if mask is not None:
        scores = scores.masked_fill(mask.reshape(-1) == 0, -1.0)
    drop = int(round(sparsity * scores.numel()))
    new = torch.ones(scores.numel(), device=weight.device)
    new[torch.sort(scores, stable=True).indices[:drop]] = 0.0
    return new.reshape(weight.shape)


@dataclass
class GradualOptions(ContrastiveOptions):
    target_sparsity: float = option(0.6, "s_f: the final fraction of the layers' weights removed (weights: masked "
                                    "in every Linear; heads-ffn: removed as heads and FFN units)", low=0.0,
                                    high=1.0, open_low=True, open_high=True)
    unit: str = option("weights", "weights: Zhu & Gupta's unstructured magnitude masks (no CPU speed-up); "
                       "heads-ffn: heads and FFN units on the same schedule, removed physically", choices=UNITS)
    score: str = option("magnitude", "heads-ffn: how heads are ranked (FFN units always by magnitude): "
                        "magnitude, Michel importance or LRP relevance of the current model", choices=SCORES)
    initial_sparsity: float = option(0.0, "s_i: the sparsity at t0", low=0.0, high=1.0, open_high=True)
    start_step: int = option(0, "t0: the gate-phase step of the first mask update", low=0)
    interval: int = option(25, "dt: steps between mask updates (Zhu & Gupta: 100-1000 made little difference)",
                           low=1)
    updates: int = option(0, "n: mask updates after t0 (0: as many as fit before the gate phase ends)", low=0)
    score_examples: int = option(64, "training examples importance / relevance are scored on at each update",
                                 low=1)
    protect_roles: bool = option(False, "heads-ffn: rank every head with a Voita / Olsson role (found once on the "
                                 "dense model, at least 20 training texts) above every role-free head")


@register
class Gradual(PruningMethod):
    name = "gradual"
    order = 6
    summary = ("Zhu & Gupta 2017: gradual pruning while training, cubic sparsity schedule; weights "
               "(magnitude masks) or heads and FFN units (removed)")
    Options = GradualOptions
    learned = True

    @classmethod
    def check_config(cls, options, config) -> None:
        o = options
        CubicSchedule.fitted(o.target_sparsity, o.initial_sparsity, o.start_step, o.interval, o.updates,
                             config.steps)
        if o.unit == "weights":
            refuse_lora(cls.name, config)
            if o.score != "magnitude":
                raise ValueError("gradual --unit weights ranks weights by |w| (Zhu & Gupta); --score importance "
                                 "or relevance ranks heads: use it with --unit heads-ffn.")
        if o.protect_roles and o.unit != "heads-ffn":
            raise ValueError("--protect-roles ranks heads: use it with --unit heads-ffn.")
        if config.data_spec.is_text and (o.score != "magnitude" or o.contrastive or o.protect_roles):
            raise ValueError("importance, relevance, roles and CAP's supervised terms need labelled examples; on "
                             "language-modelling text use gradual with --score magnitude, no --contrastive and no "
                             "--protect-roles.")

    def setup(self, student: LoadedModel) -> list[torch.nn.Parameter]:
        o, c = self.options, self.context
        self.student = student
        self.schedule = CubicSchedule.fitted(o.target_sparsity, o.initial_sparsity, o.start_step, o.interval,
                                             o.updates, c.gate_steps)
        self.state = GateState.dense(c.shape)
        self.masks: dict[str, torch.Tensor] = {}
        if o.unit == "weights":
            self.linears = {name: m for layer in range(c.shape.layers)
                            for name, m in layer_linears(student, layer).items()}
            self.masks = {name: torch.ones_like(m.weight) for name, m in self.linears.items()}
        self.cap = ContrastiveTerms(o, student.is_decoder, c.device) if o.contrastive else None
        self.protected = role_heads(c, o.score_examples) if o.protect_roles else None
        return []

    # ------------------------------------------------------------------ the schedule

    def step(self, step: int) -> None:
        """After the model's optimizer step: update the masks at the schedule's steps, zero what is masked."""
        if self.schedule.updates_at(step):
            sparsity = self.schedule.at(step)
            if self.options.unit == "weights":
                self.masks = {name: magnitude_mask(self.linears[name].weight, sparsity, mask)
                              for name, mask in self.masks.items()}
            else:
                self.state = self._structured_state(sparsity)
        self._zero_masked()

    @torch.no_grad()
    def _zero_masked(self) -> None:
        for name, mask in self.masks.items():
            self.linears[name].weight.mul_(mask)

    def _structured_state(self, sparsity: float) -> GateState:
        """Heads and FFN units kept at `sparsity`, ranked on the current model; closed ones stay closed."""
        c, old = self.context, self.state
        heads = self._head_scores()
        if self.protected is not None:
            heads = protect_scores(heads, self.protected)
        heads = heads.masked_fill(old.head == 0, float("-inf"))
        units = unit_scores("intermediate", self.student.adapter, "magnitude", 0, "gradual")
        units = units.masked_fill(old.intermediate == 0, float("-inf"))
        state = closest_state(lambda keep: per_layer_state(c.shape, heads, units, keep), c.sizes, sparsity)
        return state.replace(head=state.head * old.head, intermediate=state.intermediate * old.intermediate)

    def _head_scores(self) -> torch.Tensor:
        """(L, H) head scores of the current student by `score` (closed heads are gated off meanwhile)."""
        o, c = self.options, self.context
        if o.score == "magnitude":
            return unit_scores("head", self.student.adapter, "magnitude", 0, "gradual")
        from pruning.baselines import head_scores

        rows = c.train.subset(o.score_examples, seed=c.seed)
        model = self.student.model
        model.eval()
        try:
            return head_scores(o.score, self.student, rows.texts, rows.labels, seed=c.seed)
        finally:
            model.train()
            model.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ what the loop reads

    def train_state(self, step: int) -> GateState:
        return self.state

    def gate_state(self, step: int) -> GateState:
        return self.state

    def finish_gates(self, step: int) -> dict[str, torch.Tensor]:
        return {name: mask.detach().cpu() for name, mask in self.masks.items()}

    def needs_hidden_states(self) -> bool:
        return self.options.contrastive

    def needs_teacher(self, distill: bool) -> bool:
        return distill or self.options.contrastive

    def loss(self, step, labels, outputs, teacher_outputs, state, attention_mask, task):
        teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
        terms = task(outputs.logits, labels, teacher_logits)
        if self.cap is not None:
            terms.update(self.cap(outputs, teacher_outputs, labels, attention_mask, self.batch_inputs))
        return terms

    def target(self, step: int) -> float | None:
        return self.schedule.at(step)

    def expected_sparsity(self, step: int) -> float | None:
        if self.options.unit == "weights":
            closed = sum(float((m == 0).sum()) for m in self.masks.values())
            return closed / max(1, sum(m.numel() for m in self.masks.values()))
        return exact_sparsity(self.state, model=self.context.sizes)

    def progress_note(self, step: int) -> str:
        return f"sparsity {self.schedule.at(step):.2f} of {self.options.target_sparsity:.2f}"

    def state_dict(self) -> dict:
        return {"masks": {name: mask.bool().cpu() for name, mask in self.masks.items()},
                "state": self.state.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        device = self.context.device
        self.masks = {name: mask.float().to(device) for name, mask in state["masks"].items()}
        self.state = GateState.from_dict(state["state"])
