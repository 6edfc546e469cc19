"""int8 export, the `cluster` method (vocabulary pruning + k-means sharing), `peer` distillation and `flop`, on tiny
models: each one's defining invariant."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from core.data.dataset import TextDataset
from core.lowrank import LowRankLinear
from core.models import load_model
from core.pruned import load_pruned
from pruning import calibration
from pruning.__main__ import main
from pruning.export import ONNX_FILE, save_pruned
from pruning.factorised import FactorisedLinear
from pruning.gate_state import GateState
from pruning.int8 import INT8_ONNX_FILE, compare, interleaved_ms, onnx_logits, predict, quantize_torch, torch_logits
from pruning.kmeans_share import (
    CLUSTERED_FILE,
    folder_bytes,
    kmeans_1d,
    load_clustered,
    pack,
    save_clustered,
    share_weights,
    shareable_names,
    unpack,
)
from pruning.methods.peer import distil_into_peers, distil_layers, head_slices, reconstruction_error, similar_peers
from pruning.runs import RunStore
from pruning.sequential import editable_copy
from pruning.session import classification_examples
from pruning.surgery import prune
from pruning.vocab import corpus_vocabulary, prune_vocabulary

TEXTS = ["a great film, warm and funny", "an awful, boring movie", "meh", "not bad at all, really",
         "the plot drags on and on", "one of the best this year", "i want those two hours back", "fine"]
# int8's stated accuracy band on the tiny model: |int8 - fp32 logit| <= 3% of the fp32 logits' range (5% for ONNX
# Runtime's 7-bit weights: twice the rounding step), and at least 7 of the 8 predictions equal fp32's
BAND, ONNX_BAND, AGREE = 0.03, 0.05, 7 / 8


@pytest.fixture(scope="module")
def spread(tiny_dir):
    """The tiny classifier, its classifier scaled so the logits spread over a few units (random init gives
    ~0.05, where any rounding flips an argmax), one head pruned."""
    loaded = load_model(str(tiny_dir))
    with torch.no_grad():
        loaded.model.classifier.weight.mul_(60)
    return prune(loaded, GateState.from_closed_heads(loaded, [(0, 1)]))


@pytest.fixture(scope="module")
def int8_folder(spread, tmp_path_factory):
    return save_pruned(spread, tmp_path_factory.mktemp("int8") / "pruned", int8=True)


def _within_band(out: np.ndarray, ref: np.ndarray, band: float = BAND) -> None:
    assert np.abs(out - ref).max() <= band * (ref.max() - ref.min())
    assert np.mean(out.argmax(1) == ref.argmax(1)) >= AGREE


def test_int8_onnx_runs_in_onnxruntime_within_the_band(spread, int8_folder):
    fp32 = predict(onnx_logits(int8_folder / ONNX_FILE), spread.tokenizer, TEXTS)
    int8 = predict(onnx_logits(int8_folder / INT8_ONNX_FILE), spread.tokenizer, TEXTS)
    ref = predict(torch_logits(spread.model), spread.tokenizer, TEXTS)
    assert np.abs(fp32 - ref).max() <= 1e-4  # the fp32 export is torch's model
    assert not np.array_equal(int8, fp32)  # quantised: not the same graph
    _within_band(int8, fp32, ONNX_BAND)
    assert (int8_folder / INT8_ONNX_FILE).stat().st_size < 0.5 * (int8_folder / ONNX_FILE).stat().st_size


def test_int8_onnx_weights_fit_7_bits_so_no_cpu_saturates(int8_folder):
    """Every MatMulInteger weight lies in [-64, 64] with one scale per output column: a u8 x s8 pair then sums
    to at most 2 * 255 * 64 < 2^15, so CPUs without VNNI (VPMADDUBSW's saturating int16) give VNNI's result."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(int8_folder / INT8_ONNX_FILE).graph
    weights = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert matmuls
    for node in matmuls:
        w, zero = weights[node.input[1]], weights[node.input[3]]
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64 and w.max() > 32  # 7 bits, and used
        assert zero.shape == (w.shape[1],) and not zero.any()  # per output channel, symmetric


def test_torch_int8_replaces_every_linear_and_stays_in_the_band(spread):
    int8 = quantize_torch(spread.model)
    assert not any(type(m) is nn.Linear for m in int8.modules())
    assert any(type(m) is nn.Linear for m in spread.model.modules())  # the original is unchanged
    _within_band(predict(torch_logits(int8), spread.tokenizer, TEXTS),
                 predict(torch_logits(spread.model), spread.tokenizer, TEXTS))


def test_compare_reports_all_four_against_fp32(spread, int8_folder):
    data = TextDataset(TEXTS, [0, 1] * 4, ["neg", "pos"], "toy")
    report = compare(spread, data, int8_folder, rounds={1: (1, 1), 4: (1, 1)})
    by_name = {v.name: v for v in report.variants}
    assert list(by_name) == ["torch fp32", "torch int8", "onnx fp32", "onnx int8"]
    ref = predict(torch_logits(spread.model), spread.tokenizer, TEXTS)
    assert by_name["torch fp32"].accuracy == np.mean(ref.argmax(1) == np.array(data.labels))
    assert by_name["torch fp32"].max_logit_diff == 0 and by_name["onnx fp32"].agreement == 1
    assert by_name["onnx int8"].size_bytes == (int8_folder / INT8_ONNX_FILE).stat().st_size
    assert all(set(v.latency_ms) == {1, 4} and min(v.latency_ms.values()) > 0 for v in report.variants)
    assert "onnx int8" in report.table()


def test_apply_int8_cli(tiny_dir, reviews_csv, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["apply", "--threads", "1", "--model", str(tiny_dir), "--prune-heads", "0:0", "--data",
                 str(reviews_csv), "--limit", "10", "--out", str(out), "--int8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert (out / ONNX_FILE).is_file() and (out / INT8_ONNX_FILE).is_file()
    names = [v["name"] for v in record["int8"]["variants"]]
    assert names == ["torch fp32", "torch int8", "onnx fp32", "onnx int8"]
    assert record["int8"]["examples"] == 4  # the dev split: 10% of the CSV's 40 rows


# ----------------------------------------------------------------------------- cluster: vocabulary pruning

CORPUS = ["a great film, warm and funny", "an awful, boring movie", "the film is warm and the plot is funny"]
IN_VOCAB = ["a warm film", "the plot is a great movie, and funny", "boring"]  # only the corpus's words


def _logits(loaded, texts):
    batch = loaded.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


@pytest.fixture(scope="module")
def small_vocab(tiny_dir):
    loaded = load_model(str(tiny_dir))
    vocabulary = corpus_vocabulary(loaded.tokenizer, CORPUS, min_count=1)
    return loaded, vocabulary, prune_vocabulary(loaded, vocabulary)


def test_vocabulary_pruning_keeps_in_vocabulary_logits_and_maps_the_rest_to_unk(small_vocab):
    loaded, vocabulary, small = small_vocab
    counted = {i for ids in loaded.tokenizer(CORPUS)["input_ids"] for i in ids}
    assert set(vocabulary.kept) == counted | set(loaded.tokenizer.all_special_ids)
    assert small.model.get_input_embeddings().weight.shape == (len(vocabulary.kept), 32) and len(small.tokenizer) == \
        len(vocabulary.kept)
    assert torch.equal(_logits(small, IN_VOCAB), _logits(loaded, IN_VOCAB))
    old, new = loaded.tokenizer(IN_VOCAB)["input_ids"], small.tokenizer(IN_VOCAB)["input_ids"]
    assert new == [[vocabulary.kept.index(i) for i in ids] for ids in old]  # same pieces, renumbered
    ids = small.tokenizer(["a zebra film"])["input_ids"][0]
    assert small.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "a", "[UNK]", "film", "[SEP]"]
    counts = corpus_vocabulary(loaded.tokenizer, CORPUS, min_count=2)  # tokens seen twice or more, plus specials
    assert set(counts.kept) - set(loaded.tokenizer.all_special_ids) == {
        loaded.tokenizer.convert_tokens_to_ids(t) for t in ("film", "warm", "and", "funny", "the", "is", ",")}
    assert 0 < counts.unknown_share < 1


def test_a_vocabulary_pruned_export_works_standalone(small_vocab, tmp_path):
    _, vocabulary, small = small_vocab
    folder = save_pruned(prune(small, GateState.dense(small)), tmp_path / "v")
    back = load_pruned(folder)
    assert len(back.tokenizer) == len(vocabulary.kept) and back.model.config.vocab_size == len(vocabulary.kept)
    assert torch.equal(_logits(back, IN_VOCAB), _logits(small, IN_VOCAB))


# ----------------------------------------------------------------------------- cluster: k-means sharing

def test_kmeans_codebook_is_a_lloyd_fixed_point_with_nearest_assignment():
    torch.manual_seed(0)
    values = torch.randn(40, 30)
    shared = kmeans_1d(values, bits=3, iterations=100)
    assert shared.codebook.shape == (8,) and shared.indices.dtype == torch.uint8
    distances = (values.reshape(-1, 1) - shared.codebook.reshape(1, -1)).abs()
    assert torch.equal(shared.indices.reshape(-1).long(), distances.argmin(1))  # every value to its nearest centroid
    for k in range(8):  # every centroid the mean of its values
        members = values.reshape(-1)[shared.indices.reshape(-1) == k]
        assert torch.allclose(shared.codebook[k], members.mean(), atol=1e-5)
    assert torch.equal(unpack(pack(shared.indices), 1200), shared.indices.reshape(-1))
    odd = torch.tensor([3, 15, 0, 7, 9], dtype=torch.uint8)
    assert torch.equal(unpack(pack(odd), 5), odd) and pack(odd).numel() == 3
    again = kmeans_1d(shared.decode(), bits=3)
    assert torch.equal(again.decode(), shared.decode())  # sharing a shared tensor loses nothing


def test_clustered_export_round_trips_to_the_clustered_model(small_vocab, tmp_path):
    _, _, small = small_vocab
    clustered = prune(small, GateState.dense(small))
    names = shareable_names(clustered, ffn=True)
    assert len(names) == 1 + 2 * 2  # the embedding table, FFN in and out of both layers
    share_weights(clustered.model, names, bits=4)
    for name in names:
        assert clustered.model.get_parameter(name).unique().numel() <= 16
    dense = save_pruned(clustered, tmp_path / "dense")
    folder = save_clustered(clustered, tmp_path / "clustered", 4, names)
    packed = load_file(str(folder / CLUSTERED_FILE))
    assert {k for k in packed} == {f"{n}.{part}" for n in names for part in ("codebook", "indices", "shape")}
    for name in names:  # 4 bits: two indices a byte
        assert packed[f"{name}.indices"].numel() == (clustered.model.get_parameter(name).numel() + 1) // 2
    assert not set(names) & set(load_file(str(folder / "model.safetensors")))
    back = load_clustered(folder)
    assert torch.equal(_logits(back, IN_VOCAB), _logits(clustered, IN_VOCAB))
    assert folder_bytes(folder) < folder_bytes(dense)


def test_cluster_runs_through_the_cli(tiny_dir, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    small = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]
    common = ["train", "--model", str(tiny_dir), "--data", str(reviews), "--method", "cluster", *small]
    assert main([*common, "--bits", "4", "--finetune-steps", "2"]) == 2  # centroids are not fine-tuned: refused
    assert main([*common, "--bits", "0", "--finetune-steps", "2"]) == 2  # the teacher reads the old ids: refused
    assert main([*common, "--bits", "0", "--finetune-steps", "2", "--no-distill"]) == 0  # then fine-tune
    assert main([*common, "--bits", "4", "--finetune-steps", "0"]) == 0
    runs = sorted(RunStore().list(), key=lambda r: r.id)
    assert [r.status for r in runs] == ["done", "done"], [r.error for r in runs]
    for run in runs:
        trained = load_pruned(run.run_dir / "model")
        assert len(trained.tokenizer) < 100  # the CSV's few words and the specials
    out = tmp_path / "exported"
    assert main(["runs", "export", str(runs[1].id), "--out", str(out)]) == 0
    assert (out / CLUSTERED_FILE).is_file()
    back, trained = load_clustered(out), load_pruned(runs[1].run_dir / "model")
    assert torch.equal(_logits(back, ["a great film", "an awful film"]), _logits(trained, ["a great film",
                                                                                            "an awful film"]))


# ----------------------------------------------------------------------------- peer

def test_peer_distillation_is_the_least_squares_refit_and_beats_plain_removal():
    torch.manual_seed(0)
    heads, head_dim, d, n = 4, 3, 5, 200
    mix = torch.randn(heads * head_dim, heads * head_dim)
    z = (torch.randn(n, heads * head_dim) @ mix).double()  # correlated heads: a peer can stand in
    weight, gram = torch.randn(d, heads * head_dim).double(), z.T @ z
    removed, kept = [1], [0, 2, 3]
    peers = similar_peers(weight, gram, head_dim, removed, kept, peers=2)
    assert len(peers) == 2 and set(peers) <= set(kept)
    new = distil_into_peers(weight, gram, head_dim, removed, peers, ridge=0.0)
    p, r = head_slices(heads, head_dim, peers), head_slices(heads, head_dim, removed)
    fixed = head_slices(heads, head_dim, [h for h in kept if h not in peers])
    target = z @ weight.T - z[:, fixed] @ weight[:, fixed].T  # what the peers' columns must produce
    assert torch.allclose(new[:, p].T, torch.linalg.lstsq(z[:, p], target).solution, atol=1e-8)
    assert torch.equal(new[:, fixed], weight[:, fixed]) and torch.equal(new[:, r], weight[:, r])
    k = head_slices(heads, head_dim, kept)

    def direct(w):  # the attention output without the removed head, against the dense one
        return float(((z[:, k] @ w[:, k].T - z @ weight.T) ** 2).sum())

    assert reconstruction_error(new, weight, gram, head_dim, removed) == pytest.approx(direct(new))
    assert reconstruction_error(weight, weight, gram, head_dim, removed) == pytest.approx(direct(weight))
    assert direct(new) < 0.9 * direct(weight)
    ridged = distil_into_peers(weight, gram, head_dim, removed, peers, ridge=0.1)
    assert direct(new) <= direct(ridged) < direct(weight)


def test_peer_lowers_each_layers_error_on_the_tiny_model_against_plain_removal(tiny_dir):
    loaded = load_model(str(tiny_dir))
    rows = [f"a {w} film number {i}" for i in range(12) for w in ("great", "awful", "dull and long")]
    examples = classification_examples(loaded, TextDataset(rows, [0] * len(rows), ["neg", "pos"], "toy"), 32)
    kept = torch.tensor([[True, False, True, False], [False, True, True, True]])
    batches = calibration.batches(examples, len(rows), 8, seed=0)
    copy = editable_copy(loaded, "test")
    errors = distil_layers(copy, kept, batches, examples, peers=2, ridge=0.0)
    outputs = {str(i): loaded.adapter.attention_output(i) for i in range(2)}
    ref = calibration.linear_inputs(loaded, examples, batches, outputs, gram=True)
    for layer, (plain, peer) in enumerate(errors):
        w, w_new = outputs[str(layer)].weight.detach(), copy.adapter.attention_output(layer).weight.detach()
        removed = [h for h in range(4) if not kept[layer, h]]
        assert peer < plain and plain == pytest.approx(reconstruction_error(w, w, ref[str(layer)].gram, 8, removed))
        assert peer == pytest.approx(reconstruction_error(w_new, w, ref[str(layer)].gram, 8, removed))
        kept_columns = head_slices(4, 8, [h for h in range(4) if kept[layer, h]])
        assert not torch.equal(w_new[:, kept_columns], w[:, kept_columns])  # the peers changed


def test_peer_keeps_the_heads_plain_removal_keeps_through_the_cli(tiny_dir, reviews, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADLAB_HOME", str(tmp_path))
    small = ["--batch-size", "8", "--eval-every", "10", "--eval-budget", "1", "--eval-examples", "8"]
    common = ["train", "--model", str(tiny_dir), "--data", str(reviews), "--target-sparsity", "0.4",
              "--finetune-steps", "2", *small]
    assert main([*common, "--method", "peer", "--score", "importance", "--calibration-examples", "16"]) == 0
    assert main([*common, "--method", "importance", "--score-examples", "256"]) == 0
    peer, plain = sorted(RunStore().list(), key=lambda r: r.id)
    assert peer.status == plain.status == "done", (peer.error, plain.error)
    assert torch.equal(RunStore().gates(peer.id, 0).head, RunStore().gates(plain.id, 0).head)
    assert 0 < int((RunStore().gates(peer.id, 0).head > 0).sum()) < 8


# ----------------------------------------------------------------------------- flop

def torch_linear(module):
    def run(batch):
        with torch.inference_mode():
            return module(batch["x"])
    return run


def test_factorised_layer_equals_the_dense_one_at_full_rank():
    torch.manual_seed(0)
    linear = nn.Linear(12, 7)
    layer = FactorisedLinear.from_linear(linear)
    assert layer.rank == 7 and layer.p.shape == (7, 7) and layer.q.shape == (7, 12)
    x = torch.randn(3, 5, 12)
    layer.gates = None  # z = 1: P Q = W exactly (up to float rounding)
    assert torch.allclose(layer(x), linear(x), atol=1e-5)
    gated = FactorisedLinear.from_linear(linear).eval()  # gates start open: their eval value is sigma(12) ~ 1
    assert torch.allclose(gated(x), linear(x), atol=1e-4) and gated.kept_rank() == 7


def test_the_kept_rank_follows_the_gates():
    torch.manual_seed(0)
    linear = nn.Linear(80, 60)
    layer = FactorisedLinear.from_linear(linear).eval()
    with torch.no_grad():
        layer.gates.log_alpha.copy_(torch.linspace(-4.6, 1.0, 60)[torch.randperm(60)])
    expected = float(layer.expected_open().detach())
    z = layer.gates.deterministic()
    assert layer.kept_rank() == int((z > 0).sum()) == 60 - int(60 - expected + 0.5)
    assert torch.equal(z > 0, layer.gates.log_alpha >= layer.gates.log_alpha.sort().values[60 - layer.kept_rank()])
    small = layer.compact()
    x = torch.randn(4, 80)
    assert isinstance(small, LowRankLinear) and small.rank == layer.kept_rank() < 60 * 80 / 140  # thin pays off
    assert torch.allclose(small(x), layer(x), atol=1e-5)  # the folded gates compute what the gated layer did
    with torch.no_grad():
        layer.gates.log_alpha.fill_(4.6)
    assert isinstance(layer.compact(), nn.Linear)  # k (in + out) >= in * out: the dense product is cheaper


def test_thin_matrices_are_faster_where_k_in_plus_out_is_small():
    torch.manual_seed(0)
    linear = nn.Linear(768, 768)
    layer = FactorisedLinear.from_linear(linear, rank=48)
    layer.gates = None
    x = torch.randn(32, 64, 768)
    ms = interleaved_ms({"dense": torch_linear(linear), "thin": torch_linear(layer)}, {"x": x}, rounds=3, repeats=3)
    assert ms["thin"] < ms["dense"]  # 48 * 1536 = 1/8 of the multiply-adds (measured 2-11x, a margin for load)
