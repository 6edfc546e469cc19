"""One data spec (`core.data.DataSpec`): round trips, the 80/10/10 rule every path follows, label maps, and
the chosen text column being what every path reads (evaluation, analysis, Gates measurement, export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.data import (
    DataError,
    DataSpec,
    format_label_map,
    load_data,
    load_default_task,
    load_splits,
    parse_label_map,
    read_table,
)
from pruning.config import TrainConfig

# ----------------------------------------------------------------------------- round trips

FULL = DataSpec("reviews.csv", "review", "verdict", {"pos": "fresh", "neg": "rotten"}, whole_file=True)


def test_label_map_text_round_trip():
    mapping = parse_label_map(" pos = fresh ,neg=rotten")
    assert mapping == {"pos": "fresh", "neg": "rotten"}
    assert format_label_map(mapping) == "pos=fresh,neg=rotten" and parse_label_map(format_label_map(mapping)) == mapping
    assert parse_label_map("") == parse_label_map(None) == {} and format_label_map({}) == ""


@pytest.mark.parametrize("text, message", [
    ("pos", "comma-separated FILE=MODEL pairs"),
    ("pos=fresh,=rotten", "Got '=rotten'"),
    ("pos=fresh,POS=rotten", "names the file label 'POS' twice"),
])
def test_bad_label_map_text_is_one_line(text, message):
    with pytest.raises(DataError, match=message) as info:
        parse_label_map(text)
    assert "\n" not in str(info.value)


def test_spec_json_round_trip_and_normalising():
    assert DataSpec.from_json(FULL.to_json()) == FULL
    assert json.loads(FULL.to_json())["label_map"] == {"pos": "fresh", "neg": "rotten"}
    assert DataSpec.from_json("{}") == DataSpec() == DataSpec(" Default ")
    assert DataSpec("r.csv", " review ", "  ") == DataSpec("r.csv", "review", None)
    assert DataSpec.of("r.csv") == DataSpec("r.csv") and DataSpec.of(FULL) is FULL


@pytest.mark.parametrize("make, message", [
    (lambda: DataSpec.from_json('{"path": "r.csv", "colour": 1}'), "got unknown 'colour'"),
    (lambda: DataSpec.from_json("[1]"), "must be a JSON object"),
    (lambda: DataSpec.from_json("{oops"), "must be JSON"),
    (lambda: DataSpec(""), "No data given"),
    (lambda: DataSpec("default", text_column="review"), "default task's columns are fixed"),
    (lambda: DataSpec("default", whole_file=True), "applies to a data file"),
    (lambda: DataSpec("r.csv", label_map="pos=fresh"), "must map file labels to model labels"),
    (lambda: DataSpec("r.csv", label_map={"pos": ""}), "non-empty label names"),
])
def test_bad_spec_is_one_line(make, message):
    with pytest.raises(DataError, match=message) as info:
        make()
    assert "\n" not in str(info.value)


def test_train_config_carries_the_spec(tmp_path):
    config = TrainConfig.build(**TrainConfig.data_fields(DataSpec("r.csv", "review", None, {"pos": "fresh"})))
    assert config.data_spec == DataSpec("r.csv", "review", None, {"pos": "fresh"})
    args = config.cli_args()
    assert args[args.index("--label-map") + 1] == "pos=fresh"
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))).data_spec == config.data_spec
    assert "--label-map" not in TrainConfig().cli_args()
    with pytest.raises(ValueError, match="'whole file' applies to evaluation only"):
        TrainConfig.data_fields(FULL)
    with pytest.raises(ValueError, match="must map file labels"):
        TrainConfig(data="r.csv", label_map=["pos"]).check()


# ----------------------------------------------------------------------------- the split rule


def test_a_file_is_split_80_10_10_unless_the_whole_file_is_asked_for(junk_text):
    spec = DataSpec(str(junk_text), text_column="review")
    splits = load_splits(spec, ["neg", "pos"])
    parts = [set(splits.split(s).texts) for s in ("train", "dev", "test")]
    assert [len(p) for p in parts] == [96, 12, 12]
    assert len(set.union(*parts)) == 120 == len(set(read_table(junk_text, text_column="review").texts))
    dev = load_data(spec, "dev", ["neg", "pos"])
    assert dev.texts == splits.dev.texts == load_data(spec).texts  # with or without the model's names: same rows
    assert dev.selection == "dev split, 12 of 120 rows, seeded 80/10/10"
    assert "the same rows on every page and in training" in spec.caption(dev)
    whole = DataSpec(str(junk_text), text_column="review", whole_file=True)
    assert len(load_data(whole, "dev", ["neg", "pos"])) == 120
    assert "every row, as asked" in whole.caption(load_data(whole))
    with pytest.raises(DataError, match="no 'train' split"):
        load_data(whole, "train")
    with pytest.raises(DataError, match="'whole file' applies to evaluation only"):
        load_splits(whole)


def test_default_task_dev_is_the_cached_split():
    assert load_data("default") is load_default_task().dev
    assert load_data(DataSpec(), "test") is load_default_task().test


# ----------------------------------------------------------------------------- label maps


def test_a_label_map_puts_file_labels_onto_the_model_labels(tmp_path):
    path = tmp_path / "pn.csv"
    path.write_text("text,label\n" + "".join(f"good {i},pos\nbad {i},neg\n" for i in range(10)))
    spec = DataSpec(str(path), label_map=parse_label_map("pos=fresh,neg=rotten"))
    data = load_data(spec, "dev", ["fresh", "rotten"])
    assert data.label_names == ["fresh", "rotten"]
    assert all((label == 0) == text.startswith("good") for text, label in zip(data.texts, data.labels))
    upper = load_data(DataSpec(str(path), label_map={"POS": "Fresh", "neg": "rotten"}), "dev", ["fresh", "rotten"])
    assert upper.labels == data.labels  # names match in any case
    with pytest.raises(DataError, match=r"does not know: 'pos', 'neg'.*map them onto these with a label map"):
        load_data(DataSpec(str(path)), "dev", ["fresh", "rotten"])
    with pytest.raises(DataError, match="labels the model does not know: 'neg'") as info:
        load_data(DataSpec(str(path), label_map={"pos": "fresh"}), "dev", ["fresh", "rotten"])
    assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="sends 'pos' to 'good', which is not one of the model's labels: fresh, rotten"):
        load_data(DataSpec(str(path), label_map={"pos": "good"}), "dev", ["fresh", "rotten"])


def test_the_default_task_maps_onto_other_label_names():
    dev = load_default_task().dev
    mapped = load_data(DataSpec(label_map={"fresh": "pos", "rotten": "neg"}), "dev", ["neg", "pos"])
    assert mapped.texts == dev.texts and mapped.labels == [1 - y for y in dev.labels]
    with pytest.raises(DataError, match="does not know: 'fresh', 'rotten'"):
        load_data("default", "dev", ["neg", "pos"])


# ----------------------------------------------------------------------------- every path reads the chosen column


def spy(monkeypatch, module, name: str, seen: list[str], texts=lambda data: data.texts, arg: int = 1):
    """Wrap `module.name` so the texts of the data it is given (positional argument `arg`) go to `seen`."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.extend(texts(args[arg]))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.fixture
def columns(junk_text, tmp_path, monkeypatch) -> list[str]:
    """CLI options choosing the `review` column of `junk_text`; HEADLAB_HOME is a fresh folder."""
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    return ["--data", str(junk_text), "--text-column", "review"]


def dev_reviews(junk_text: Path) -> list[str]:
    """The dev rows every path must read: the seeded dev split of the `review` column."""
    texts = load_data(DataSpec(str(junk_text), text_column="review")).texts
    assert len(texts) == 12 and all(t.startswith("a ") and " film number " in t for t in texts)
    return texts


def test_core_evaluate_reads_the_chosen_column_of_the_dev_rows(tiny_dir, junk_text, columns, monkeypatch, capsys):
    import core.__main__ as cli

    seen: list[str] = []
    spy(monkeypatch, cli, "summarise", seen)
    assert cli.main(["evaluate", "--model", str(tiny_dir), *columns, "--json"]) == 0
    assert seen == dev_reviews(junk_text) and json.loads(capsys.readouterr().out)["examples"] == 12
    seen.clear()
    assert cli.main(["evaluate", "--model", str(tiny_dir), *columns, "--whole-file", "--json"]) == 0
    assert sorted(seen) == sorted(read_table(junk_text, text_column="review").texts)  # every row, only when asked
    seen.clear()
    assert cli.main(["evaluate", "--model", str(tiny_dir), "--data", str(junk_text), "--json"]) == 0
    assert set(seen) == {"movie"}  # without the choice the 'text' column is read: the reason to carry it


@pytest.mark.parametrize("command, function, texts", [
    ("relevance", "relevance_table", lambda data: data.texts),
    ("roles", "head_roles", lambda texts: texts),
    ("heads", "build_report", lambda data: data.texts),
])
def test_analysis_reads_the_chosen_column_of_the_dev_rows(command, function, texts, tiny_dir, junk_text, columns,
                                                          tmp_path, monkeypatch):
    import analysis.__main__ as cli

    seen: list[str] = []
    spy(monkeypatch, cli, function, seen, texts)
    out = tmp_path / ("report" if command == "heads" else f"{command}.csv")
    assert cli.main([command, "--model", str(tiny_dir), *columns, "--limit", "500", "--out", str(out)]) == 0
    assert seen == dev_reviews(junk_text)


def test_gates_measurement_reads_the_chosen_column_of_the_dev_rows(tiny_dir, junk_text, columns, tmp_path,
                                                                   monkeypatch):
    import pruning.cli.apply as cli
    from core.models import load_model
    from pruning.__main__ import main
    from pruning.gate_state import GateState

    gates = tmp_path / "gates.json"
    gates.write_text(GateState.from_closed_heads(load_model(str(tiny_dir)), [(0, 1)]).to_json())
    seen: list[str] = []
    spy(monkeypatch, cli, "compare_state", seen, arg=2)
    out = tmp_path / "full.json"
    assert main(["evaluate", "--threads", "1", "--model", str(tiny_dir), *columns, "--gates", str(gates),
                 "--out", str(out)]) == 0
    assert seen == dev_reviews(junk_text) and json.loads(out.read_text())["examples"] == 12


def test_export_reads_the_chosen_column_of_the_dev_rows(tiny_dir, junk_text, columns, tmp_path, monkeypatch):
    import pruning.cli.apply as cli
    from pruning.__main__ import main

    seen: list[str] = []
    real = cli.load_data

    def load_data(*args):
        data = real(*args)
        seen.extend(data.texts)
        return data

    monkeypatch.setattr(cli, "load_data", load_data)
    assert main(["apply", "--threads", "1", "--model", str(tiny_dir), *columns, "--prune-heads", "0:1",
                 "--out", str(tmp_path / "pruned"), "--json"]) == 0
    assert seen == dev_reviews(junk_text)


def test_training_evaluates_on_the_same_dev_rows(tiny_dir, junk_text, tmp_path, monkeypatch):
    import pruning.live
    import pruning.record
    from pruning.__main__ import main
    from pruning.runs import RunStore

    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    renamed = tmp_path / "good_bad.csv"  # the same rows with labels the model does not have: mapped below
    renamed.write_text(junk_text.read_text().replace(",pos\n", ",good\n").replace(",neg\n", ",bad\n"))
    seen: list[str] = []
    for module in (pruning.live, pruning.record):
        spy(monkeypatch, module, "figures", seen)
    assert main(["train", "--model", str(tiny_dir), "--data", str(renamed), "--text-column", "review",
                 "--label-map", "good=pos,bad=neg", "--method", "dense", "--finetune-steps", "2", "--batch-size", "8",
                 "--eval-every", "10", "--eval-examples", "4", "--checkpoint-every", "0"]) == 0
    assert seen and set(seen) == set(dev_reviews(junk_text))  # the last eval step reads the whole dev split
    config = TrainConfig.from_dict(RunStore().list()[0].config)
    assert config.label_map == {"good": "pos", "bad": "neg"} and "good=pos,bad=neg" in config.cli_args()


def test_cli_options_round_trip_a_spec():
    from core.cli import Parser, add_data_options, data_spec

    parser = Parser()
    add_data_options(parser)
    assert data_spec(parser.parse_args(FULL.cli_args())) == FULL
    assert data_spec(parser.parse_args([])) == DataSpec()
    with pytest.raises(DataError, match="FILE=MODEL pairs"):
        data_spec(parser.parse_args(["--data", "r.csv", "--label-map", "pos:fresh"]))


def test_cli_refuses_whole_file_for_fine_tuning_and_unknown_labels_with_one_line(tiny_dir, junk_text, columns,
                                                                                tmp_path, capsys):
    import core.__main__ as cli

    assert cli.main(["finetune", "--model", str(tiny_dir), *columns, "--whole-file", "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: Training and fine-tuning use the seeded 80/10/10 split of "
                                               f"{junk_text}; 'whole file' applies to evaluation only.")
    assert cli.main(["evaluate", "--model", str(tiny_dir), *columns, "--label-map", "pos=fresh"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The label map sends 'pos' to 'fresh', which is not one of the model's labels: ")
    assert "\n" not in err


# ----------------------------------------------------------------------------- the Model page


def test_model_page_label_table_and_whole_file_checkbox(tiny_dir, tmp_path, monkeypatch):
    """A file labelled good/bad on a model with neg/pos: refused until the label table maps them; the map and
    the whole-file choice then reach the session's spec, its caption and the evaluation job."""
    from tests.conftest import link_prepared
    from tests.test_app import app, metrics, run_until

    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HEADLAB_HOME", str(link_prepared(tmp_path / "home")))
    data = tmp_path / "good_bad.csv"
    data.write_text("text,label\n" + "".join(f"a great film {i},good\nan awful film {i},bad\n" for i in range(20)))
    at = app()
    at.radio(key="model_choice").set_value("Local Hugging Face folder").run()
    at.text_input(key="model_path").input(str(tiny_dir)).run()
    at.radio(key="data_choice").set_value("File path").run()
    at.text_input(key="data_path").input(str(data)).run()
    errors = [e.value for e in at.error]
    assert any("labels the model does not know: 'good', 'bad'" in e for e in errors), errors
    table = at.data_editor(key="label_table").value
    assert list(table["data label"]) == ["bad", "good"] and table["model label"].isna().all()

    at.session_state["label_table"] = {"edited_rows": {0: {"model label": "neg"}, 1: {"model label": "pos"}},
                                       "added_rows": [], "deleted_rows": []}
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.session_state["data_spec"] == DataSpec(str(data), label_map={"bad": "neg", "good": "pos"})
    assert "dev split, 4 of 40 rows, seeded 80/10/10" in at.caption[1].value

    at.checkbox(key="whole_file").check().run()
    assert at.session_state["data_spec"].whole_file and "the whole file, 40 rows" in at.caption[1].value
    run_until(at, lambda a: "Dev accuracy" in metrics(a))  # the job got the map and the whole file, or it fails
    assert next(m for m in at.metric if m.label == "Dev accuracy").help == "on 40 examples"
