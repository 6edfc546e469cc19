"""ZipLM: the structured OBS rule against least squares, the latency table's cache and prediction, the
search's latency guarantee against brute force, and whole runs on a tiny encoder and decoder."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from core.adapter import GateShape
from core.data import TextDataset
from core.models import load_model
from core.pruned import load_pruned
from pruning import latency_table
from pruning.__main__ import main
from pruning.config import TrainConfig
from pruning.distributed import Dist
from pruning.gate_state import GateState
from pruning.latency_table import LatencyTable, Structure
from pruning.methods.ziplm import BUCKETS, search, structure_for_speedup
from pruning.obs import hessian, obs_path, reconstruction_error, refit
from pruning.runs import RunStore
from pruning.session import Job, TrainSession

LABEL_MAP = "pos=fresh,neg=rotten"
FAST_TABLE = dict(grid=4, rounds=1, repeats=2, budget_s=0.2)


def correlated_inputs(n: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g, dtype=torch.float64) @ torch.randn(features, features, generator=g,
                                                                                     dtype=torch.float64)


def removed_columns(path, k: int, features: int) -> list[int]:
    return [c for c in range(features) if c // path.size in path.removed(k)]


# ----------------------------------------------------------------------------- OBS


def test_obs_update_beats_plain_removal_and_its_saliency_is_the_error_it_adds():
    x = correlated_inputs(300, 12)  # (N, in)
    w = torch.randn(7, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gram = x.T @ x
    path = obs_path(w, hessian(gram), size=3, keep_weights=range(5), damp=0.0)
    assert sorted(path.order) == [0, 1, 2, 3] and path.errors[0] == 0
    for k in range(1, 4):
        updated = path.weights[k]
        cut = removed_columns(path, k, 12)
        assert torch.all(updated[:, cut] == 0)
        plain = w.clone()
        plain[:, cut] = 0
        obs_error = reconstruction_error(w, updated, gram)
        assert obs_error == pytest.approx(float(((x @ (w - updated).T) ** 2).sum()), rel=1e-9)
        assert obs_error < reconstruction_error(w, plain, gram)
        assert obs_error == pytest.approx(float(path.errors[k]), rel=1e-7)  # ρ/2 summed = the error added
    dampened = obs_path(w, hessian(gram), size=3, keep_weights=range(5))  # the default λ = 0.01
    for k in range(1, 4):
        plain = w.clone()
        plain[:, removed_columns(dampened, k, 12)] = 0
        assert reconstruction_error(w, dampened.weights[k], gram) < reconstruction_error(w, plain, gram)
        # the closed form the method rebuilds its weights with is where the path arrived
        assert torch.allclose(refit(w, hessian(gram), dampened.removed(k), 3), dampened.weights[k], atol=1e-9)
    assert torch.allclose(refit(w, hessian(gram), path.removed(2), 3, damp=0.0), path.weights[2], atol=1e-9)


def test_saliency_and_update_match_a_direct_least_squares_refit():
    """Hand-made case: 6 inputs in 3 structures of 2. Each candidate's ρ/2 is the least-squares error of
    refitting the other 4 columns; OBS removes the cheapest and its update is that refit."""
    x = correlated_inputs(40, 6, seed=3)
    w = torch.tensor([[1.0, -2.0, 0.5, 0.3, 2.0, -1.0], [0.2, 0.1, -1.5, 1.0, 0.4, 0.6]], dtype=torch.float64)
    target = x @ w.T  # (N, out)
    refits = {}
    for m in range(3):
        keep = [c for c in range(6) if c // 2 != m]
        solution = torch.linalg.lstsq(x[:, keep], target).solution.T  # (out, 4)
        refit = torch.zeros_like(w)
        refit[:, keep] = solution
        refits[m] = (float(((target - x @ refit.T) ** 2).sum()), refit)
    h = hessian(x.T @ x)
    hinv = torch.linalg.inv(h)
    for m in range(3):  # the formula itself: ρ_M = Σ_i W_iM ((H⁻¹)_MM)⁻¹ W_iMᵀ
        cols = slice(2 * m, 2 * m + 2)
        rho = sum(float(w[i, cols] @ torch.linalg.inv(hinv[cols, cols]) @ w[i, cols]) for i in range(2))
        assert rho / 2 == pytest.approx(refits[m][0], rel=1e-8)
    path = obs_path(w, h, size=2, keep_weights=[1], damp=0.0)
    cheapest = min(refits, key=lambda m: refits[m][0])
    assert path.order[0] == cheapest
    assert float(path.errors[1]) == pytest.approx(refits[cheapest][0], rel=1e-8)
    assert torch.allclose(path.weights[1], refits[cheapest][1], atol=1e-9)


# ----------------------------------------------------------------------------- search


def hand_table(layers: int = 2) -> LatencyTable:
    return LatencyTable(key={}, layers=layers, constant=1.0, attention=[0.0, 0.3, 0.5, 0.9],
                        widths=[0, 2, 4], ffn=[0.0, 0.7, 1.1])


def test_search_meets_the_target_and_finds_the_brute_force_optimum():
    table = hand_table()
    rng = np.random.default_rng(0)
    attention = np.sort(rng.random((2, 4)), axis=1)[:, ::-1].copy()  # fewer heads kept: more error
    attention[:, -1] = 0
    ffn = np.sort(rng.random((2, 3)), axis=1)[:, ::-1].copy()
    ffn[:, -1] = 0

    def error(s: Structure) -> float:
        return sum(attention[i, h] + ffn[i, table.widths.index(u)] for i, (h, u) in enumerate(zip(s.heads, s.units)))

    everything = [Structure((h0, h1), (u0, u1)) for h0, h1 in itertools.product(range(4), repeat=2)
                  for u0, u1 in itertools.product(table.widths, repeat=2)]
    for speedup in (1.0, 1.2, 1.5, 2.0, 3.0):
        target = table.dense / speedup
        found = search(table, attention, ffn, target)
        assert table.predicted_latency(found) <= target + 1e-12
        def optimum(budget: float) -> float:
            return min(error(s) for s in everything if table.predicted_latency(s) <= budget + 1e-12)

        # each of the 4 sublayers' costs is rounded up by less than one unit of the budget
        slack = 4 * (target - table.constant) / BUCKETS
        assert optimum(target) <= error(found) <= optimum(target - slack)
    assert search(table, attention, ffn, table.dense) == Structure((3, 3), (4, 4))
    with pytest.raises(ValueError, match="embeddings"):
        search(table, attention, ffn, 0.9)  # below the constant part


# ----------------------------------------------------------------------------- latency table


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(str(tiny_dir))


def test_the_latency_table_is_cached_per_batch_shape_and_predicts_a_pruned_model(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    table = latency_table.load_or_build(tiny, 2, 16, **FAST_TABLE)
    shape = GateShape.of(tiny)
    assert not table.cached and table.layers == 2 and len(table.attention) == shape.heads + 1
    assert table.widths[0] == 0 and table.widths[-1] == shape.intermediate
    for entries in (table.attention, table.ffn):
        assert entries[0] == 0 and all(b >= a for a, b in zip(entries, entries[1:]))
    stored = json.loads(latency_table.cache_path(table.key).read_text())
    assert stored["key"]["batch_size"] == 2 and stored["key"]["seq_len"] == 16 and stored["build_s"] > 0

    def no_build(*args, **kwargs):
        raise AssertionError("the cached table should have been read")

    monkeypatch.setattr(latency_table, "build", no_build)
    again = latency_table.load_or_build(tiny, 2, 16, grid=4)
    assert again.cached and again == table
    monkeypatch.undo()
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    other = latency_table.load_or_build(tiny, 4, 16, **FAST_TABLE)  # another batch shape: measured anew
    assert not other.cached and latency_table.cache_path(other.key) != latency_table.cache_path(table.key)
    assert len(list((tmp_path / "latency_tables").glob("*.json"))) == 2

    dense = latency_table.level_state(shape, shape.heads, shape.intermediate)
    assert table.predicted_latency(dense) == pytest.approx(table.dense)
    half = latency_table.level_state(shape, 2, 32)  # 32 of 64 units: on the grid of 4
    assert table.predicted_latency(half) == pytest.approx(
        table.constant + 2 * (table.attention[2] + table.ffn[table.widths.index(32)]))
    check = latency_table.check_prediction(tiny, table, half, rounds=2, repeats=3)
    print(f"predicted {check.predicted_s * 1e3:.3f} ms, measured {check.measured_s * 1e3:.3f} ms, "
          f"ratio {check.ratio:.2f}; table built in {table.build_s:.1f} s")
    assert check.ratio > 0 and math.isfinite(check.ratio)


# ----------------------------------------------------------------------------- whole runs


def cache_hand_table(loaded, batch_size: int, seq_len: int, grid: int) -> LatencyTable:
    """A made-up table (constant 1 s, 0.1 s per head, 0.3 s per full FFN) stored in the cache as if this
    machine had measured it: the structure a run picks then does not depend on the machine's load."""
    shape = GateShape.of(loaded)
    widths = latency_table.ffn_widths(shape.intermediate, grid)
    table = LatencyTable(key=latency_table.table_key(loaded, batch_size, seq_len, grid), layers=shape.layers,
                         constant=1.0, attention=[0.1 * h for h in range(shape.heads + 1)], widths=widths,
                         ffn=[0.3 * w / shape.intermediate for w in widths])
    path = latency_table.cache_path(table.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.to_json())
    return table


def session_of(run, tmp_path) -> TrainSession:
    """The run's session rebuilt in this process from its recorded config."""
    config = TrainConfig.from_dict(run.config)
    job = Job(run_id=run.id, config=config.to_dict(), run_dir=tmp_path / "session", attempt=1, resume=False)
    return TrainSession(config, job, None, None, None, Dist())


@pytest.fixture
def one_thread():
    """Runs use 1 torch thread (TrainConfig.threads); tables are keyed by threads, so time as they do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_ziplm_run_exports_the_obs_updated_model(kind, tiny_dir, tiny_decoders, reviews, tmp_path, monkeypatch,
                                                   one_thread):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    folder = tiny_dir if kind == "encoder" else tiny_decoders["llama"]
    extra = [] if kind == "encoder" else ["--label-map", LABEL_MAP]
    table = cache_hand_table(load_model(str(folder)), 2, 16, grid=4)  # the run reads it from the cache
    speedup = 1.6
    options = dict(target_speedup=speedup, calibration_examples=16, ffn_grid=4, latency_batch_size=2,
                   latency_seq_len=16)
    assert main(["train", "--model", str(folder), "--data", str(reviews), "--method", "ziplm", "--finetune-steps", "0",
                 "--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8", *extra,
                 *[f"--{k.replace('_', '-')}={v}" for k, v in options.items()]]) == 0
    run = RunStore().list()[0]
    assert run.status == "done", run.error
    exported = load_pruned(run.result["export"])

    # the same run in this process (the table read from the cache): its sliced model is what was exported
    s = session_of(run, tmp_path)
    s.one_shot()
    plan = s.method.plan
    state = plan.result.state
    assert plan.table.cached and plan.table.to_json() == table.to_json()
    assert state.to_dict() == RunStore().gates(run.id, 0).to_dict()
    assert table.predicted_latency(state) <= table.dense / speedup + 1e-12
    assert (state.head == 0).any() or (state.intermediate == 0).any()
    batch = s.examples.batch(np.arange(8))[0]
    s.student.model.eval()  # the fine-tune's copy is in train mode (dropout)
    with torch.no_grad():
        assert torch.allclose(exported.model(**batch).logits, s.student.model(**batch).logits, atol=1e-5)

    # the kept columns of the output projections moved (the OBS update)
    base, source = s.base.adapter, plan.result.source.adapter
    changed = [not torch.equal(base.attention_output(i).weight, source.attention_output(i).weight) or
               not torch.equal(base.ffn_out(i).weight, source.ffn_out(i).weight) for i in range(len(base.layers))]
    assert any(changed)


def test_structure_for_speedup_gives_the_gates_page_a_structure_within_the_target(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    table = cache_hand_table(tiny, 2, 16, grid=4)
    speedup = 1.6
    texts = [f"a {word} film number {i}" for i in range(20) for word in ("great", "awful")]
    data = TextDataset(texts=texts, labels=[0] * len(texts), label_names=list(tiny.label_names), name="calibration")
    found = structure_for_speedup(tiny, speedup, data, calibration_examples=16, batch_size=2, seq_len=16, ffn_grid=4)
    assert found.table.to_json() == table.to_json() and found.predicted_s <= table.dense / speedup + 1e-12
    assert found.predicted_speedup >= speedup - 1e-9
    kept = Structure.of(found.result.state)
    assert sum(kept.heads) < table.layers * table.heads or sum(kept.units) < table.layers * table.widths[-1]
    with pytest.raises(ValueError, match="smaller target_speedup"):
        structure_for_speedup(tiny, table.dense / table.constant * 1.5, data, calibration_examples=16, batch_size=2,
                              seq_len=16, ffn_grid=4)


def test_the_structure_command_writes_a_gates_file_pruning_apply_reads(tiny, tiny_dir, reviews, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    table = cache_hand_table(tiny, latency_table.BATCH_SIZE, latency_table.SEQ_LEN, latency_table.FFN_GRID)
    out = tmp_path / "ziplm.json"
    assert main(["structure", "--model", str(tiny_dir), "--data", str(reviews), "--speedup", "1.5",
                 "--calibration-examples", "16", "--out", str(out)]) == 0
    state = GateState.from_json(out.read_text())
    assert table.dense / table.predicted_latency(Structure.of(state)) >= 1.5 - 1e-9
    assert "predicted" in capsys.readouterr().out
    assert main(["apply", "--model", str(tiny_dir), "--data", str(reviews), "--gates", str(out),
                 "--out", str(tmp_path / "pruned"), "--limit", "8"]) == 0
    with pytest.raises(SystemExit) as bad:  # argparse: one line on stderr, exit status 2
        main(["structure", "--model", str(tiny_dir), "--speedup", "0.9", "--out", str(out)])
    assert bad.value.code == 2
