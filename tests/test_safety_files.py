"""Never lose a user's files, never listen beyond the machine, never echo a file's content in an error.

Folders are written through `core.folders` (a temporary sibling renamed into place, replaced only when
HeadLab's marker says the same writer wrote it); the app binds to 127.0.0.1 and warns when told
otherwise; error lines quote at most ~80 characters of user content; a job's page shows the error its
log ends with; every CLI survives a closed stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from streamlit import config as st_config
from streamlit.testing.v1 import AppTest

from analysis.__main__ import main as analysis_main
from analysis.heads import HeadsReport, build_report
from core.data import DataError, read_table
from core.folders import (
    MARKER,
    FolderError,
    FolderExists,
    atomic_folder,
    owned_by_headlab,
    read_marker,
    write_text_atomically,
)
from core.jobs import START, job_state, log_error, start_job
from core.messages import quote
from core.models import load_model
from pruning import export
from pruning.__main__ import main as pruning_main
from pruning.export import WRITER, save_pruned
from pruning.gate_state import GateState
from pruning.runs import RunStore
from pruning.surgery import prune

ROOT = Path(__file__).resolve().parent.parent


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder holding a user's files (notes.txt and sub/data.bin); returns their contents by path."""
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes, not HeadLab's")
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01 precious")
    return contents(path)


def contents(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def leftovers(path: Path) -> list[str]:
    """Temporary siblings of `path` left behind (`.<name>.partial-...`, `<name>.partial`, ...)."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith((f".{path.name}.", f"{path.name}.")))


def one_error_line(err: str) -> str:
    """The single `error:` line of a command's stderr (and nothing else on it)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def pruned(tiny_dir):
    loaded = load_model(str(tiny_dir))
    return prune(loaded, GateState.from_closed_heads(loaded, [(0, 1), (1, 2)]))


# ----------------------------------------------------------------------------- core.folders


def test_atomic_folder_writes_marks_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, written_by="tests.a") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-") and not out.exists()
        (tmp / "a.txt").write_text("first")
    assert (out / "a.txt").read_text() == "first" and read_marker(out)["written_by"] == "tests.a"
    assert owned_by_headlab(out) and leftovers(out) == []
    with pytest.raises(FolderExists, match="already exists"):
        with atomic_folder(out, written_by="tests.a"):
            pytest.fail("the block must not run for a taken folder")
    with pytest.raises(FolderError, match="written by HeadLab's tests.a, not tests.b"):
        with atomic_folder(out, written_by="tests.b", overwrite=True):
            pytest.fail("the block must not run for another writer's folder")
    with atomic_folder(out, written_by="tests.a", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("second")
    assert sorted(contents(out)) == ["b.txt", MARKER] and leftovers(out) == []


def test_atomic_folder_refuses_user_folders_files_and_links(tmp_path):
    mine = tmp_path / "mine"
    before = user_folder(mine)
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for target, overwrite, message in [(mine, True, "was not written by HeadLab"), (mine, False, "already exists"),
                                       (tmp_path / "file.txt", True, "is not a folder"),
                                       (tmp_path / "link", True, "is not a folder")]:
        with pytest.raises(FolderError, match=message) as info:
            with atomic_folder(target, written_by="tests.a", overwrite=overwrite):
                pytest.fail("the block must not run")
        assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert contents(mine) == before and (tmp_path / "file.txt").read_text() == "a file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "link", "mine"]
    (mine / MARKER).write_text('{"run_id": 1}')  # names no writer: not a HeadLab marker
    assert not owned_by_headlab(mine)


def test_failure_inside_the_writer_leaves_the_old_folder_and_no_partial(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out, written_by="tests.a") as tmp:
        (tmp / "a.txt").write_text("old")
    before = contents(out)
    for error in (RuntimeError("disk on fire"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            with atomic_folder(out, written_by="tests.a", overwrite=True) as tmp:
                (tmp / "a.txt").write_text("half-written")
                raise error
        assert contents(out) == before and leftovers(out) == []


def test_empty_folder_is_free(tmp_path):
    (tmp_path / "empty").mkdir()
    with atomic_folder(tmp_path / "empty", written_by="tests.a") as tmp:
        (tmp / "a.txt").write_text("x")
    assert (tmp_path / "empty" / "a.txt").read_text() == "x"


def test_write_text_atomically(tmp_path):
    path = write_text_atomically(tmp_path / "deep" / "r.json", "{}")
    assert path.read_text() == "{}" and leftovers(path) == []
    with pytest.raises(FolderError, match="is a folder"):
        write_text_atomically(tmp_path / "deep", "{}")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(FolderError, match="Cannot write in"):
        write_text_atomically(tmp_path / "blocker" / "r.json", "{}")


# ----------------------------------------------------------------------------- heads reports


def test_heads_cli_keeps_a_users_folder(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "report"
    before = user_folder(out)
    rc = analysis_main(["heads", "--model", str(tiny_dir), "--data", str(reviews_csv), "--limit", "12",
                        "--out", str(out)])
    assert rc == 2
    assert "was not written by HeadLab" in one_error_line(capsys.readouterr().err)
    assert contents(out) == before and leftovers(out) == []


def test_heads_report_save_refuses_a_users_folder_and_replaces_its_own(tiny_dir, reviews_csv, tmp_path):
    loaded = load_model(str(tiny_dir))
    report = build_report(loaded, read_table(reviews_csv, label_names=loaded.label_names), limit=8,
                          examples_per_head=1)
    mine = tmp_path / "mine"
    before = user_folder(mine)
    with pytest.raises(FolderError, match="not written by HeadLab"):
        report.save(mine)  # once deleted every file, then failed with IsADirectoryError leaving mine.partial
    assert contents(mine) == before and leftovers(mine) == []
    folder = report.save(tmp_path / "report")
    (folder / "heads.csv").write_text("stale")
    report.save(folder)  # a report HeadLab wrote is replaced
    assert len(HeadsReport.load(folder).table) == 8 and leftovers(folder) == []


# ----------------------------------------------------------------------------- pruned exports


def test_apply_overwrite_keeps_a_users_folder(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "pruned"
    before = user_folder(out)
    rc = pruning_main(["apply", "--model", str(tiny_dir), "--prune-heads", "0:0", "--data", str(reviews_csv),
                       "--limit", "4", "--out", str(out), "--overwrite"])
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "not written by HeadLab" in line
    assert contents(out) == before and leftovers(out) == []


def test_apply_out_pointing_at_a_file(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "model.txt"
    out.write_text("not a folder")
    rc = pruning_main(["apply", "--model", str(tiny_dir), "--data", str(reviews_csv), "--out", str(out),
                       "--overwrite"])
    assert rc == 2 and "is not a folder" in one_error_line(capsys.readouterr().err)
    assert out.read_text() == "not a folder"


def test_runs_export_overwrite_keeps_a_users_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    store = RunStore()
    run_id = store.create({"method": "cofi"})
    store.finish(run_id, "done", result={})
    out = tmp_path / "exported"
    before = user_folder(out)
    assert pruning_main(["runs", "export", str(run_id), "--out", str(out), "--overwrite"]) == 2
    assert "not written by HeadLab" in one_error_line(capsys.readouterr().err)
    assert contents(out) == before


def test_save_pruned_replaces_its_own_export_and_never_a_run_folder(pruned, tmp_path, monkeypatch):
    out = save_pruned(pruned, tmp_path / "export")
    assert read_marker(out)["written_by"] == WRITER and load_model(str(out)).adapter.num_heads(0) == 3
    (out / "notes.txt").write_text("left in a HeadLab export")
    save_pruned(pruned, out, overwrite=True)
    assert not (out / "notes.txt").exists() and leftovers(out) == []

    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path / "home"))
    store = RunStore()
    run_dir = store.get(store.create({})).run_dir
    (run_dir / "checkpoint.pt").write_bytes(b"weeks of training")
    with pytest.raises(FolderError, match="pruning.runs"):
        save_pruned(pruned, run_dir, overwrite=True)
    assert (run_dir / "checkpoint.pt").read_bytes() == b"weeks of training"


def test_failed_export_leaves_the_old_export_and_no_partial(pruned, tmp_path, monkeypatch):
    out = save_pruned(pruned, tmp_path / "export")
    before = contents(out)

    def broken(*args, **kwargs):
        raise RuntimeError("the exporter crashed")

    monkeypatch.setattr(export, "export_onnx", broken)
    with pytest.raises(RuntimeError, match="crashed"):
        save_pruned(pruned, out, overwrite=True, onnx=True)
    assert contents(out) == before and leftovers(out) == []


# ----------------------------------------------------------------------------- run folders


def test_run_store_deletes_only_its_own_run_folder(tmp_path):
    store = RunStore(tmp_path / "runs.sqlite")
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderError, match="is not a folder"):
        store.create({}, tmp_path / "file")
    mine = tmp_path / "mine"
    run_id = store.create({}, mine)
    assert read_marker(mine)["run_id"] == run_id
    marker = json.loads((mine / MARKER).read_text())
    (mine / MARKER).write_text(json.dumps({**marker, "run_id": run_id + 1}))  # now it names another run
    store.finish(run_id, "failed", error="x")
    store.delete(run_id)
    assert mine.is_dir()
    other = store.create({})
    own = store.get(other).run_dir
    store.finish(other, "stopped")
    store.delete(other)
    assert not own.exists()


# ----------------------------------------------------------------------------- network


def test_config_binds_to_localhost():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"


@pytest.fixture
def address():
    """Set streamlit's server.address for an AppTest run in this process; restored afterwards."""
    old = st_config.get_option("server.address")
    yield lambda value: st_config.set_option("server.address", value)
    st_config.set_option("server.address", old)


@pytest.mark.parametrize("value, banner", [("0.0.0.0", True), ("127.0.0.1", False)])
def test_banner_when_listening_beyond_the_machine(value, banner, address, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    address(value)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.session_state["model_choice"] = "Local Hugging Face folder"  # the Model page stops at its path box
    at.run()  # app.py draws the banner before st.navigation runs the page (AppTest's switch_page skips app.py)
    assert not at.exception, at.exception
    assert at.title[0].value == "Model"
    warnings = [w.value for w in at.warning if "listening on" in w.value]
    assert len(warnings) == banner and all(f"listening on {value}, not only on this machine" in w for w in warnings)


# ----------------------------------------------------------------------------- error lines


def test_quote_cuts_long_content():
    assert quote("short  text\nhere") == "short text here"
    cut = quote("x" * 10**6)
    assert cut == "x" * 80 + "… (1000000 characters)"


def test_a_1mb_csv_header_is_not_echoed(tiny_dir, tmp_path):
    data = tmp_path / "wide.csv"
    data.write_text(f"text,{'x' * 10**6}\n" + "a review without a label,\n" * 3)  # a 1 MB header line
    proc = subprocess.run([sys.executable, "-m", "core", "evaluate", "--model", str(tiny_dir), "--data", str(data)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HEADLAB_HOME": str(tmp_path)},
                          timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr) < 300 and "no label column" in one_error_line(proc.stderr), proc.stderr[:500]


def test_unknown_labels_are_quoted_short(tmp_path):
    data = tmp_path / "labels.csv"
    rows = ["text,label"] + [f"review {i},{'long label ' * 1000}{i}" for i in range(10)]
    data.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match="labels the model does not know") as info:
        read_table(data, label_names=["neg", "pos"])
    assert len(str(info.value)) < 300, str(info.value)


# ----------------------------------------------------------------------------- jobs


def wait_until_ended(name: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while job_state(name).status == "running" and time.time() < deadline:
        time.sleep(0.5)


def test_a_job_failing_before_its_first_update_shows_its_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    missing = tmp_path / "no-such-model"
    start_job("early", ["core", "evaluate", "--model", str(missing), "--data", "default", "--job", "early"])
    wait_until_ended("early")
    state = job_state("early")
    assert state.status == "failed" and str(missing) in state.error and "does not exist" in state.error, state


def test_log_error_reads_the_latest_start_only(tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "j.log"
    log.write_text(f"{START} 1\nerror: an old failure\n{START} 2\nworking\n")
    assert log_error("j") is None
    with log.open("a") as f:
        f.write('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n    boom()\n'
                f"RuntimeError: {'y' * 5000}\n")
    assert log_error("j").startswith("RuntimeError: yyy") and len(log_error("j")) < 350
    with log.open("a") as f:
        f.write("error: the folder is taken\n")
    assert log_error("j") == "the folder is taken"


# ----------------------------------------------------------------------------- closed stdout


def test_runs_list_into_a_closed_pipe_is_quiet(tmp_path):
    home = tmp_path / "home"
    store = RunStore(home / "runs.sqlite")
    for i in range(40):
        store.finish(store.create({"method": "cofi", "target_sparsity": 0.5}), "failed", error=f"failure {i}")
    proc = subprocess.Popen([sys.executable, "-m", "pruning", "runs", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT, env={**os.environ, "HEADLAB_HOME": str(home)})
    proc.stdout.close()  # the reader goes away before the command prints (like `| head` finishing)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err
