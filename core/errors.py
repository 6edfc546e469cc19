"""The errors a model folder can raise: one line each, fit for a UI error box or the CLI."""

from __future__ import annotations


class ModelError(ValueError):
    """A model folder HeadLab cannot use; the message is one line for a UI error box or the CLI."""


class ModelNotPrepared(ModelError):
    """A built-in model that has not been fine-tuned on this machine yet (`python -m core prepare`)."""

    def __init__(self, name: str):
        super().__init__(
            f"The built-in model '{name}' is not prepared yet: run `python -m core prepare {name}` "
            "(fine-tunes it once, a few minutes on 2 cores) or press 'Prepare' in the app."
        )
        self.name = name
