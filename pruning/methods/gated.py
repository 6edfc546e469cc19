"""What the two learned methods share: hard-concrete gates trained by Adam, sampled per step from a
seed every rank agrees on, clamped after each step, deterministic at eval (Louizos et al. 2018)."""

from __future__ import annotations

import numpy as np
import torch

from core.loaded import LoadedModel
from pruning.gate_state import GateState
from pruning.gates import CoFiGates
from pruning.methods.base import PruningMethod
from pruning.size import expected_sparsity


def gate_seed(seed: int, step: int) -> int:
    """The torch seed of step `step`'s gate noise: the same on every rank, independent of how much
    randomness dropout or evaluation consumed before."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


class GatedMethod(PruningMethod):
    """A learned method whose gates are a `CoFiGates` module (`make_gates`) stepped by Adam at `gate_lr`."""

    learned = True

    def make_gates(self, student: LoadedModel) -> CoFiGates:
        raise NotImplementedError

    def setup(self, student: LoadedModel) -> list[torch.nn.Parameter]:
        self.gates = self.make_gates(student).to(self.context.device)
        self.gates.train()
        self._optimizers = {"gates": torch.optim.Adam(self.gates.parameters(), lr=self.options.gate_lr)}
        return []

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self._optimizers

    def modules(self) -> list[torch.nn.Module]:
        return [self.gates]

    def train_state(self, step: int) -> GateState:
        """A train-time sample drawn from `gate_seed(seed, step)` (the global RNG is left as it was)."""
        if not self.pruning(step):
            return GateState.dense(self.context.shape)
        device = self.context.device
        cuda = device.type == "cuda"
        with torch.random.fork_rng(devices=[device] if cuda else [], device_type=device.type):
            torch.manual_seed(gate_seed(self.context.seed, step))
            return self.gates.sample()

    def step(self, step: int) -> None:
        for opt in self._optimizers.values():
            opt.step()
        self.gates.clamp_()

    def gate_state(self, step: int) -> GateState:
        return self.gates.deterministic() if self.pruning(step) else GateState.dense(self.context.shape)

    def expected_sparsity(self, step: int) -> float | None:
        return float(expected_sparsity(self.gates, model=self.context.sizes).detach())
