"""The Model page driven headless with Streamlit's AppTest, on the real fine-tuned default model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.data import DataSpec
from tests.conftest import link_prepared, stop_background_work

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh_home(tmp_path, monkeypatch) -> Iterator[Path]:
    """A HEADLAB_HOME with the prepared models and packages but no cached results or jobs."""
    link_prepared(tmp_path)
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    yield tmp_path
    stop_background_work(tmp_path)


def app() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def run_until(at: AppTest, done, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not done(at) and time.time() < deadline:
        time.sleep(1)
        at.run()
        assert not at.exception, at.exception
        assert not at.error, [e.value for e in at.error]


def test_default_model_shows_architecture_accuracy_latency_and_predictions(fresh_home):
    at = app()
    shown = metrics(at)
    assert (shown["Layers"], shown["Heads"], shown["Hidden"], shown["FFN"]) == ("6", "12", "384", "1536")
    run_until(at, lambda a: "Dev accuracy" in metrics(a))
    shown = metrics(at)
    accuracy = float(shown["Dev accuracy"].rstrip("%")) / 100
    assert 0.78 <= accuracy <= 0.9, shown  # the fine-tuned default reaches ~0.83 dev
    assert shown["Latency, batch 1"].endswith("ms") and shown["Latency, batch 32"].endswith("ms")
    table = at.dataframe[0].value
    assert len(table) == 12 and set(table["predicted"]) <= {"fresh", "rotten"}
    assert "1275 examples" in at.caption[0].value


@pytest.mark.parametrize("make_bad, message", [
    (lambda tmp: tmp / "nowhere", "does not exist"),
    (lambda tmp: tmp, "no config.json"),
])
def test_bad_model_folder_shows_an_error_box(fresh_home, tmp_path, make_bad, message):
    at = app()
    at.radio(key="model_choice").set_value("Local Hugging Face folder").run()
    at.text_input(key="model_path").input(str(make_bad(tmp_path))).run()
    assert not at.exception
    assert any(message in e.value for e in at.error), [e.value for e in at.error]


def test_bad_data_file_shows_an_error_box(fresh_home, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nonly one label,fresh\nstill one,fresh\n")
    at = app()
    at.radio(key="data_choice").set_value("File path").run()
    at.text_input(key="data_path").input(str(bad)).run()
    assert not at.exception
    assert any("two labels" in e.value for e in at.error), [e.value for e in at.error]


def test_user_csv_is_evaluated_whole_when_asked(fresh_home, tmp_path):
    data = tmp_path / "mine.tsv"
    data.write_text("review\tverdict\n" + "".join(f"a splendid film, truly {i}\tfresh\nawful mess {i}\trotten\n"
                                                  for i in range(10)))
    at = app()
    at.radio(key="data_choice").set_value("File path").run()
    at.text_input(key="data_path").input(str(data)).run()
    assert "2 examples" in at.caption[0].value and "dev split, 2 of 20 rows" in at.caption[1].value
    at.checkbox(key="whole_file").check().run()
    run_until(at, lambda a: "Dev accuracy" in metrics(a))
    assert "20 examples" in at.caption[0].value and "the whole file, 20 rows" in at.caption[1].value
    assert float(metrics(at)["Dev accuracy"].rstrip("%")) >= 80


def test_headless_encoder_is_offered_a_finetune_that_then_loads(fresh_home, tmp_path):
    from tests.conftest import make_tiny

    encoder = make_tiny(tmp_path / "encoder", labels=None)
    data = tmp_path / "easy.csv"
    data.write_text("text,label\n" + "".join(f"great {i},good\nawful {i},bad\n" for i in range(30)))
    at = app()
    at.radio(key="model_choice").set_value("Local Hugging Face folder").run()
    at.text_input(key="model_path").input(str(encoder)).run()
    at.radio(key="data_choice").set_value("File path").run()
    at.text_input(key="data_path").input(str(data)).run()
    assert any("no trained classification head" in w.value for w in at.warning)
    at.button[0].click().run()  # "Fine-tune on this data"
    run_until(at, lambda a: any("Use the fine-tuned model" == b.label for b in a.button))
    next(b for b in at.button if b.label == "Use the fine-tuned model").click().run()
    assert at.text_input(key="model_path").value.startswith(str(fresh_home / "models"))
    assert not any("no trained classification head" in w.value for w in at.warning)


def test_heads_page_computes_report_in_background_then_shows_heads(fresh_home):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["heads_limit"] = 100
    at.switch_page("views/heads.py").run()
    assert not at.exception, at.exception
    run_until(at, lambda a: len(a.get("plotly_chart")) >= 4, timeout=300)
    import pandas as pd

    report = pd.read_csv(next(fresh_home.glob("cache/heads/*-100-None/heads.csv")))
    assert len(report) == 72
    assert "100 of 1275" in at.caption[0].value
    top = report.loc[report["relevance"].idxmax()]  # the page opens on the most relevant head
    assert (at.selectbox(key="head_layer").value, at.selectbox(key="head_index").value) == (top["layer"], top["head"])
    at.selectbox(key="head_layer").set_value(1).run()
    at.selectbox(key="head_index").set_value(8).run()
    assert not at.exception, at.exception
    assert at.markdown[0].value.startswith("**L1H8**")
    at.text_input(key="why_text").input("a gorgeous, witty and moving film").run()
    assert any("Predicted **fresh**" in m.value for m in at.markdown), [m.value for m in at.markdown]
    at.selectbox(key="heads_metric").set_value("importance").run()
    assert not at.exception, at.exception


def test_gates_page_presets_sliders_undo_and_live_figures(fresh_home):
    from analysis.heads import build_report, report_dir
    from core.data import load_data
    from core.models import load_model

    loaded, data = load_model("default"), load_data("default", split="dev")
    build_report(loaded, data, limit=100).save(report_dir(loaded.fingerprint, data.fingerprint(), 100, None))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("views/gates.py").run()
    assert not at.exception, at.exception
    dense = metrics(at)
    assert dense["Parameters"] == "22.71 M" and float(dense["Sparsity (CoFi)"].rstrip("%")) < 1  # biases, norms
    # nothing pruned: the dense model's own figures, never timed against itself
    assert [m.delta for m in at.metric if m.label.startswith("Latency")] == ["1.00× faster"] * 2
    next(b for b in at.button if b.label.startswith("Close the 24 least relevant")).click().run()
    assert not at.exception, at.exception
    closed = metrics(at)
    assert closed["Parameters"] != dense["Parameters"] and closed["Encoder GFLOPs / example"] < dense[
        "Encoder GFLOPs / example"]
    assert "kept 48/72 heads" in at.caption[0].value
    at.toggle(key="gates_int8").set_value(True).run()  # the pruned copy quantised, next to its fp32 self
    assert not at.exception, at.exception
    int8 = next(d.value for d in at.dataframe if "agrees with fp32" in d.value.columns)
    assert list(int8["model"]) == ["torch fp32", "torch int8"] and int8["agrees with fp32"].iloc[0] == 1
    assert abs(int8["accuracy"].iloc[1] - int8["accuracy"].iloc[0]) < 0.05
    at.toggle(key="gates_int8").set_value(False).run()
    at.radio(key="gates_colour").set_value("roles").run()
    assert not at.exception, at.exception
    at.slider[0].set_value(0.5).run()  # FFN units kept
    assert "4608/9216 FFN units" in at.caption[0].value
    assert float(metrics(at)["Sparsity (CoFi)"].rstrip("%")) > 40
    next(b for b in at.button if b.label == "Undo").click().run()
    next(b for b in at.button if b.label == "Undo").click().run()
    assert metrics(at)["Parameters"] == dense["Parameters"] and "kept 72/72 heads" in at.caption[0].value
    assert len(at.get("plotly_chart")) == 2  # the head grid and this session's history

    next(b for b in at.button if b.label.startswith("Close the 24 least relevant")).click().run()
    run_until(at, lambda a: any(s.value.startswith("Full rotten_tomatoes/dev (1275") for s in a.success))
    at.text_input(key="export_name").input("half/heads").run()
    assert any("without path separators" in e.value for e in at.error)
    at.text_input(key="export_name").input("l6-48heads").run()
    next(b for b in at.button if b.label.startswith("Export the pruned model as l6-48heads")).click().run()
    run_until(at, lambda a: any(s.value.startswith("Saved ") for s in a.success))
    exported = load_model(str(fresh_home / "exports" / "l6-48heads"))
    kept = [exported.adapter.num_heads(i) for i in range(exported.architecture().layers)]
    assert sum(kept) == 48 and "kept 48/72 heads" in exported.notes[-1]  # physically smaller (a layer may keep all 12)
    assert (fresh_home / "exports" / "l6-48heads" / "model.onnx").stat().st_size > 1e6
    at.slider[0].set_value(0.5).run()  # another state under the same name: refused, nothing overwritten
    assert any("already exists" in e.value for e in at.error), [e.value for e in at.error]


def test_gates_page_on_the_second_real_model(fresh_home):
    from core.models import load_model
    from pruning.gate_state import GateState
    from pruning.runs import RunStore

    store = RunStore()
    run = store.create({"model": "minilm-l3", "method": "cofi"}, fresh_home / "run")
    l3 = load_model("minilm-l3")
    store.add_gates(run, 10, GateState.from_closed_heads(l3, [(0, 0), (2, 3)]), attempt=0)
    store.add_gates(run, 20, GateState.from_closed_heads(l3, [(0, 0), (2, 3), (1, 1)]).with_ffn_keep(l3.adapter, 0.5),
                    attempt=0)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_spec"] = "minilm-l3"
    at.switch_page("views/gates.py").run()
    assert not at.exception, at.exception
    assert "kept 36/36 heads" in at.caption[0].value
    at.slider[1].set_value(0.5).run()  # hidden dims kept
    assert not at.exception, at.exception
    assert "192/384 hidden dims" in at.caption[0].value
    assert float(metrics(at)["Parameters"].split()[0]) < 17.4
    next(b for b in at.button if b.label.startswith(f"Load gates from run {run}")).click().run()  # latest step
    assert "kept 33/36 heads, 2304/4608 FFN units, 384/384 hidden dims" in at.caption[0].value
    at.selectbox(key="preset_step").set_value(10).run()
    next(b for b in at.button if b.label == f"Load gates from run {run} at step 10").click().run()
    assert "kept 34/36 heads, 4608/4608 FFN units" in at.caption[0].value


def finetune_steps(at: AppTest):
    return next(n for n in at.number_input if n.label == "Finetune steps")


def test_prune_page_launches_a_run_and_shows_it_live(fresh_home, tmp_path):
    from tests.conftest import make_tiny

    model = make_tiny(tmp_path / "tiny")
    data = tmp_path / "easy.csv"
    data.write_text("text,label\n" + "".join(f"a great film {i},pos\nan awful film {i},neg\n" for i in range(60)))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_spec"], at.session_state["data_spec"] = str(model), DataSpec(str(data))
    at.switch_page("views/prune.py").run()
    assert not at.exception, at.exception
    assert any("No runs yet" in i.value for i in at.info)
    at.selectbox(key="prune_method").set_value("random").run()  # one-shot baseline: prune, then a short fine-tune
    finetune_steps(at).set_value(4)  # form values are sent with the submit
    next(b for b in at.button if b.label == "Start run").click().run()
    assert not at.exception, at.exception

    def finished(a: AppTest) -> bool:
        return any("Finished runs" in str(c.proto.spec) for c in a.get("plotly_chart"))

    run_until(at, finished, timeout=300)
    table = at.dataframe[0].value
    assert table.loc[0, "status"] == "done" and table.loc[0, "method"] == "random"
    assert any(c.value.startswith("Last eval") and "Measured on cpu" in c.value for c in at.caption)
    commands = [c.value for c in at.code]
    assert commands[0] == f"python -m pruning train --run-id {table.loc[0, 'id']}"
    assert commands[1].startswith("python -m pruning train --model ") and "--method random" in commands[1]
    next(b for b in at.button if b.label.startswith("Export run")).click().run()
    run_until(at, lambda a: any(s.value.startswith("Saved") for s in a.success), timeout=180)
    exported = fresh_home / "exports" / f"run-{table.loc[0, 'id']}-random"
    assert (exported / "model.onnx").is_file() and (exported / "pruning.json").is_file()

    # the same baseline data-parallel in 2 processes (torchrun, gloo): the page shows the torchrun command
    finetune_steps(at).set_value(4)
    next(n for n in at.number_input if n.label.startswith("Processes")).set_value(2)
    next(b for b in at.button if b.label == "Start run").click().run()
    second = at.session_state["prune_run"]
    assert second != table.loc[0, "id"]
    run_until(at, lambda a: a.dataframe[0].value.set_index("id").loc[second, "status"] == "done", timeout=300)
    assert at.code[0].value == f"torchrun --standalone --nproc_per_node=2 -m pruning train --run-id {second}"
    assert any("2 process(es)" in c.value for c in at.caption if c.value.startswith("Last eval"))
    next(b for b in at.button if b.label == "Delete").click().run()
    assert not at.exception, at.exception
    assert list(at.dataframe[0].value["id"]) == [table.loc[0, "id"]] and at.selectbox(key="prune_run").value is None

    # open the last gate snapshot in Gates: the page's gates are the run's, and prune to what the run measured
    from core.models import load_model
    from pruning.runs import RunStore

    run_id = int(table.loc[0, "id"])
    store = RunStore()
    step = store.gate_steps(run_id)[-1]
    at.session_state["model_spec"] = "default"  # the session on another model: Gates takes the run's model and data
    at.selectbox(key="prune_run").set_value(run_id).run()
    next(b for b in at.button if b.label == f"Open step {step} in Gates").click().run()
    assert not at.exception, at.exception
    stored = store.gates(run_id, step)
    assert not stored.is_dense() and at.session_state["gates"].state(load_model(str(model))) == stored
    measured = next(r for r in store.records(run_id) if r.step == step)
    kept = f"kept {sum(measured.heads_alive)}/{len(measured.heads_alive) * measured.heads_total} heads"
    assert kept in at.caption[0].value, (kept, at.caption[0].value)
    shown = next(m for m in at.metric if m.label == "Parameters")
    assert shown.value == f"{measured.parameters / 1e6:.2f} M"
    assert shown.delta.startswith(f"-{measured.dense_parameters - measured.parameters:,} ")


def test_every_method_has_its_form_on_the_prune_page(fresh_home):
    from pruning.methods import methods

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("views/prune.py").run()
    for name in methods():
        at.selectbox(key="prune_method").set_value(name).run()
        assert not at.exception, (name, at.exception)
    at.selectbox(key="prune_method").set_value("gradual").run()
    labels = [w.label for w in (*at.selectbox, *at.slider, *at.number_input, *at.checkbox)]
    assert {"Unit", "Score", "Interval", "Contrastive", "Cap temperature"} <= set(labels)
    from pruning.methods.gradual import GradualOptions
    from ui.settings import own_fields_first

    names = [f.name for f in own_fields_first(GradualOptions)]
    assert names[:3] == ["target_sparsity", "unit", "score"] and names[-1] == "cap_pretrained"  # CAP's last


def test_make_it_standard_rounds_the_gates_and_says_what_it_cost(fresh_home):
    from pruning.live import ManualGates

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["model_spec"] = "minilm-l3"
    at.switch_page("views/gates.py").run()
    at.session_state["gates"] = ManualGates(closed_heads=frozenset({(0, 1), (2, 5)}), ffn_keep=0.5)
    at.run()
    assert "kept 34/36 heads" in at.caption[0].value
    at.button(key="make_standard").click().run()
    assert not at.exception, at.exception
    assert "kept 36/36 heads, 2304/4608 FFN units" in at.caption[0].value  # an encoder reopens every head
    assert any(i.value.startswith("Rounded to the nearest standard shape: accuracy") for i in at.info)
    at.button(key="make_standard").click().run()
    assert any(c.value == "The structure is standard already." for c in at.caption)
