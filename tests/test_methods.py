"""Methods are objects: a method defined in this file alone (plus its registry entry) runs through the
CLI and the Prune page form; the registry gives every method's options, defaults and help."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.data import DataSpec
from core.models import load_model
from pruning.__main__ import main
from pruning.baselines import keep_state
from pruning.gate_state import GateState
from pruning.methods import PLUGINS_ENV, PruningMethod, methods, register
from pruning.options import option
from pruning.runs import RunStore
from tests.conftest import link_prepared, stop_background_work

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]


@dataclass
class GlobalMagnitudeOptions:
    keep: float = option(0.5, "fraction of the heads (and of each layer's FFN units) to keep", low=0.0, high=1.0,
                         open_low=True)


@register
class GlobalMagnitude(PruningMethod):
    """A toy one-shot method: heads ranked over the whole model by the L2 norm of their W_O columns."""

    name = "global-magnitude"
    summary = "test: keep the heads of largest ||W_O columns|| over the whole model"
    Options = GlobalMagnitudeOptions

    def prune(self) -> GateState:
        return keep_state(self.context.base, head_norms(self.context.base), self.options.keep)


def head_norms(loaded) -> torch.Tensor:
    """(L, H) L2 norm of each head's columns of W_O."""
    a = loaded.adapter
    rows = []
    for layer in range(len(a.layers)):
        w = a.attention_output(layer).weight.detach()  # (d, H * d_h)
        rows.append(w.reshape(w.shape[0], a.num_heads(layer), -1).norm(dim=(0, 2)))
    return torch.stack(rows)


def test_registry_lists_every_method_with_its_options(capsys):
    known = methods()
    assert list(known)[:6] == ["cofi", "l0", "relevance", "importance", "random", "dense"]
    assert "global-magnitude" in known
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name, cls in known.items():
        assert f"{name}: {cls.summary}" in out
        for f in dataclasses.fields(cls.Options):
            assert f"--{f.name.replace('_', '-')} (default {f.default}): {f.metadata['help']}" in out


def test_a_method_from_this_file_runs_through_the_cli(tiny_dir, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    assert main(["train", "--model", str(tiny_dir), "--data", str(reviews), "--method", "global-magnitude",
                 "--keep", "0.5", "--finetune-steps", "4", *SMALL]) == 0
    run = RunStore().list()[0]
    assert run.status == "done" and run.config["options"] == {"keep": 0.5}
    state = RunStore().gates(run.id, 0)
    norms = head_norms(load_model(str(tiny_dir)))
    kept = state.head.flatten() > 0
    assert int(kept.sum()) == 4  # half of the 8 heads: the 4 of largest norm, over both layers
    assert norms.flatten()[kept].min() > norms.flatten()[~kept].max()
    assert main(["train", "--model", str(tiny_dir), "--data", str(reviews), "--method", "global-magnitude",
                 "--target-sparsity", "0.5"]) == 2  # an option of other methods: refused, one line


@pytest.fixture
def app_home(tmp_path, monkeypatch) -> Iterator[Path]:
    monkeypatch.setenv("HEADLAB_HOME", str(link_prepared(tmp_path)))
    yield tmp_path
    stop_background_work(tmp_path)


def test_a_method_from_this_file_runs_through_the_prune_page_form(tiny_dir, reviews, app_home, monkeypatch):
    monkeypatch.setenv(PLUGINS_ENV, "tests.test_methods")  # the background job imports it too
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_spec"], at.session_state["data_spec"] = str(tiny_dir), DataSpec(str(reviews))
    at.switch_page("views/prune.py").run()
    at.selectbox(key="prune_method").set_value("global-magnitude").run()
    assert not at.exception, at.exception
    keep = next(s for s in at.slider if s.label == "Keep")  # the form is built from the method's Options
    assert keep.help == GlobalMagnitudeOptions.__dataclass_fields__["keep"].metadata["help"]
    keep.set_value(0.25)
    next(n for n in at.number_input if n.label == "Finetune steps").set_value(4)
    assert not any(n.label == "Steps" for n in at.number_input)  # a one-shot method has no gate phase
    next(b for b in at.button if b.label == "Start run").click().run()
    assert not at.exception, at.exception
    store = RunStore()
    deadline = time.time() + 240
    while time.time() < deadline and store.list()[0].status not in ("done", "failed", "interrupted"):
        time.sleep(1)
    run = store.list()[0]
    assert run.status == "done", run.error
    assert run.config["method"] == "global-magnitude" and run.config["options"]["keep"] == pytest.approx(0.25)
    assert int((store.gates(run.id, 0).head > 0).sum()) == 2  # a quarter of 8 heads


def test_a_sweep_queues_one_run_per_target_and_each_reaches_its_target(tiny_dir, reviews, app_home):
    """`sweep` records one run per target with the method's target set to it, queues them in the background
    (one trains at a time) or, with --wait, trains them here; the sparsity each reaches grows with its target."""
    options = ["--model", str(tiny_dir), "--data", str(reviews), "--method", "random", "--finetune-steps", "2", *SMALL]
    assert main(["sweep", *options, "--targets", "0.3,0.6"]) == 0
    store = RunStore()
    deadline = time.monotonic() + 240
    while not all(r.status == "done" for r in store.list()) and time.monotonic() < deadline:
        assert not [r for r in store.list() if r.status in ("failed", "stopped")]
        time.sleep(1)
    assert main(["sweep", *options, "--targets", "0.45", "--wait"]) == 0
    runs = sorted(store.list(), key=lambda r: r.config["options"]["target_sparsity"])
    assert [r.config["options"]["target_sparsity"] for r in runs] == [0.3, 0.45, 0.6]
    assert all(r.status == "done" for r in runs)
    reached = [r.final.sparsity for r in runs]
    assert reached == sorted(reached) and reached[0] < reached[-1]
    for bad in (["--targets", "0.3", "--target-sparsity", "0.5"], ["--targets", "0.3,0.3"], ["--targets", "x"]):
        assert main(["sweep", *options, *bad]) == 2
    assert main(["sweep", *options[:-len(SMALL) - 4], "--method", "dense", "--targets", "0.3"]) == 2  # no target
