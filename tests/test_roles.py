"""Head roles: planted patterns on synthetic word attention, hand-checked numbers, alignment, a real model."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from analysis.attention import align_words, capture_attention, word_attention
from analysis.roles import (
    SentenceView,
    build_view,
    head_roles,
    load_parser,
    parse_role,
    score_heads,
    top_attended_words,
    typical_sentences,
)
from core.models import ModelNotPrepared, load_model
from tests.conftest import MINILM_DIR

RELS = ("nsubj", "obj", "amod", "advmod", "det")


def one_hot_rows(targets: np.ndarray, w: int) -> np.ndarray:
    """(W, W) attention where row i puts all its weight on targets[i]."""
    a = np.zeros((w, w), dtype=np.float32)
    a[np.arange(w), targets] = 1.0
    return a


def random_sentence(rng: np.random.Generator, w: int) -> dict:
    """A random dependency tree (root = word 0 or another), labels and zipf values with a unique minimum."""
    root = int(rng.integers(w))
    heads = [-1 if i == root else int(rng.choice([j for j in range(w) if j != i])) for i in range(w)]
    labels = ["ROOT" if i == root else str(rng.choice(RELS)) for i in range(w)]
    zipf = rng.uniform(3.0, 7.0, size=w)
    zipf[int(rng.integers(w))] = 1.0
    return dict(heads_dep=heads, deprels=labels, zipf=zipf.tolist())


def views(patterns, n: int = 40, seed: int = 0, w_range=(5, 16)) -> list[SentenceView]:
    """n random sentences; head h of layer 0 uses patterns[h](sentence, W) -> (W, W) attention."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w = int(rng.integers(*w_range))
        sent = random_sentence(rng, w)
        att = np.stack([p(sent, w) for p in patterns])[None]  # (1, H, W, W)
        out.append(SentenceView(attention=att, **sent))
    return out


def previous(sent, w):
    return one_hot_rows(np.maximum(np.arange(w) - 1, 0), w)


def to_head(sent, w):
    heads = np.array(sent["heads_dep"])
    return one_hot_rows(np.where(heads >= 0, heads, np.arange(w)), w)


def to_rarest(sent, w):
    return one_hot_rows(np.full(w, int(np.argmin(sent["zipf"]))), w)


def uniform(sent, w):
    return np.full((w, w), 1.0 / w, dtype=np.float32)


# ----------------------------------------------------------------------------- planted roles


def test_previous_word_head_is_positional_minus_one():
    table = score_heads(views([previous, uniform]))
    prev, unif = table.iloc[0], table.iloc[1]
    assert prev["positional_offset"] == -1 and prev["positional_frac"] >= 0.9
    assert prev["positional"] and prev["roles"].startswith("positional(-1)")
    assert not unif["positional"]


def test_dependency_head_is_syntactic_not_positional():
    table = score_heads(views([to_head, previous], n=60))
    syn, prev = table.iloc[0], table.iloc[1]
    for rel in ("nsubj", "dobj", "amod", "advmod"):  # spaCy's obj is scored as dobj
        assert syn[f"{rel}_pairs"] >= 20
        assert syn[f"{rel}_dep2head"] == 1.0
        assert syn[f"{rel}_dep2head_baseline"] < 0.5
        assert f"syntactic({rel}:dep2head)" in syn["roles"].split("+")
    assert not syn["positional"] and syn["positional_frac"] < 0.5
    assert "syntactic" not in prev["roles"]
    assert table["syntactic"].tolist() == [True, False]


def test_rarest_word_head_is_rare_word():
    table = score_heads(views([to_rarest, uniform, previous]))
    rare = table.iloc[0]
    assert rare["rare_hit_rate"] == 1.0 and rare["rare_word"] and "rare-word" in rare["roles"]
    assert table["rare_word"].tolist() == [True, False, False]
    sents = views([uniform])
    assert rare["rare_chance"] == pytest.approx(np.mean([1 / s.n_words for s in sents]))


def test_long_words_do_not_make_a_rare_word_head():
    """A head spreading attention evenly over tokens 'finds' the rarest word when it has the most pieces."""
    rng = np.random.default_rng(1)
    sents = []
    for _ in range(40):
        w = int(rng.integers(5, 12))
        sent = random_sentence(rng, w)
        pieces = np.ones(w, dtype=int)
        pieces[int(np.argmin(sent["zipf"]))] = 3
        att = np.tile(pieces / pieces.sum(), (w, 1)).astype(np.float32)[None, None]
        sents.append(SentenceView(attention=att, pieces=pieces.tolist(), **sent))
    row = score_heads(sents).iloc[0]
    assert row["rare_hit_rate"] == 1.0 and row["rare_piece_baseline"] == 1.0
    assert not row["rare_word"]


def test_uniform_head_has_no_role_and_confidence_one_over_w():
    row = score_heads(views([uniform], w_range=(8, 9))).iloc[0]
    assert row["confidence"] == pytest.approx(1 / 8)
    assert row["roles"] == "" and not (row["positional"] or row["syntactic"] or row["rare_word"])


# ----------------------------------------------------------------------------- hand-computed numbers


def test_confidence_positional_and_baseline_by_hand():
    a = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.1, 0.2, 0.6]], dtype=np.float32)
    b = np.array([[0.2, 0.7], [0.9, 0.1]], dtype=np.float32)
    s1 = SentenceView(a[None, None], heads_dep=[1, -1, 1], deprels=["amod", "ROOT", "amod"], zipf=[5, 5, 5])
    s2 = SentenceView(b[None, None], heads_dep=[1, -1], deprels=["amod", "ROOT"], zipf=[5, 5])
    row = score_heads([s1, s2], min_pairs=1).iloc[0]
    assert row["confidence"] == pytest.approx((0.5 + 0.6 + 0.6 + 0.7 + 0.9) / 5)
    assert row["word_mass"] == pytest.approx((1.0 + 1.0 + 0.9 + 0.9 + 1.0) / 5)
    # argmax offsets: s1 → 0, -1, 0; s2 → +1, -1. Offsets 0 and -1 tie at 2 words; the tie goes to 0,
    # which all 5 words can follow (-1 would have scored 2 of the 3 words that have a left neighbour).
    assert row["positional_offset"] == 0 and row["positional_frac"] == pytest.approx(2 / 5)
    # amod arcs dep→head: 0→1 (+1), 2→1 (-1), 0→1 (+1): baseline "+1" is right 2/3 of the time
    assert row["amod_pairs"] == 3
    assert row["amod_dep2head_baseline"] == pytest.approx(2 / 3)
    assert row["amod_dep2head"] == pytest.approx(1 / 3)  # only s2's word 0 picks its head
    assert row["amod_head2dep"] == pytest.approx(2 / 3)  # s1's word 1 picks word 0 (1 of 2), s2's word 1 → 0
    assert np.isnan(row["nsubj_dep2head"]) and row["nsubj_pairs"] == 0


def test_word_attention_sums_targets_means_sources_drops_specials():
    # tokens: [CLS] a1 a2 b1 b2 [SEP]; word a = pieces 1, 2; word b = pieces 3, 4
    att = np.array([
        [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],
        [0.1, 0.2, 0.1, 0.4, 0.1, 0.1],
        [0.3, 0.0, 0.2, 0.2, 0.2, 0.1],
        [0.0, 0.1, 0.1, 0.1, 0.6, 0.1],
        [0.2, 0.3, 0.3, 0.0, 0.0, 0.2],
        [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
    ], dtype=np.float32)[None, None]
    got = word_attention(att, [None, 0, 0, 1, 1, None])
    expected = np.array([
        [((0.2 + 0.1) + (0.0 + 0.2)) / 2, ((0.4 + 0.1) + (0.2 + 0.2)) / 2],
        [((0.1 + 0.1) + (0.3 + 0.3)) / 2, ((0.1 + 0.6) + (0.0 + 0.0)) / 2],
    ])
    assert got.shape == (1, 1, 2, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got[0, 0], expected, atol=1e-6)
    with pytest.raises(ValueError, match="word_ids"):
        word_attention(att, [None, 0, 1])


# ----------------------------------------------------------------------------- alignment


TRICKY = "I don't like U.S. e-mail  spam 😀"


def test_align_words_on_tricky_sentence():
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    enc = tokenizer(TRICKY, return_offsets_mapping=True, add_special_tokens=False)
    spans = {}
    for wid, (s, e) in zip(enc.word_ids(), enc["offset_mapping"]):
        spans[wid] = (min(s, spans.get(wid, (s, e))[0]), max(e, spans.get(wid, (s, e))[1]))
    hf_spans = [spans[w] for w in sorted(spans)]
    doc = load_parser()(TRICKY)
    aligned = align_words(hf_spans, doc)
    assert len(aligned) == len(hf_spans)
    pairs = {TRICKY[s:e]: doc[t].text for (s, e), t in zip(hf_spans, aligned) if t is not None}
    assert pairs["don"] == "do" and pairs["t"] == "n't"
    assert pairs["U"] == "U.S." and pairs["S"] == "U.S."
    assert pairs["spam"] == "spam" and pairs["😀"] == "😀"
    assert all(t is not None for t in aligned)
    assert align_words([(0, 1), (5, 6)], [(0, 3)]) == [0, None]
    assert align_words([(0, 1)], []) == [None]


def test_build_view_counts_each_arc_once(tiny_dir):
    record = capture_attention(load_model(str(tiny_dir)), [TRICKY])[0]
    view = build_view(record, load_parser()(TRICKY))
    assert view.n_words == len(record.words) == len(view.heads_dep)
    us = [i for i, w in enumerate(record.words) if w in ("U", "S", ".")][:4]
    assert sum(view.deprels[i] != "" for i in us) == 1  # "U.S." is one spaCy token, one arc
    assert np.isnan(view.zipf[record.words.index("'")])  # punctuation is never the rarest word
    assert all(-1 <= h < view.n_words for h in view.heads_dep)


# ----------------------------------------------------------------------------- capture


def test_capture_attention_unpads_and_flags_truncation(tiny_dir):
    loaded = load_model(str(tiny_dir))
    texts = ["a short one", "a much longer sentence, with more words than the first one has", ""]
    records = capture_attention(loaded, texts, batch_size=2)
    for text, rec in zip(texts, records):
        t = len(rec.tokens)
        assert rec.attention.shape == (2, 4, t, t) and rec.attention.dtype == np.float32
        np.testing.assert_allclose(rec.attention.sum(-1), 1.0, atol=1e-5)
        assert rec.word_ids[0] is None and rec.word_ids[-1] is None and not rec.truncated
        assert [text[s:e] for s, e in rec.word_spans] == rec.words
    alone = capture_attention(loaded, texts[:1])[0]
    np.testing.assert_allclose(alone.attention, records[0].attention, atol=1e-5)
    cut = capture_attention(loaded, texts[1:2], max_length=6)[0]
    assert cut.truncated and len(cut.tokens) == 6 and cut.tokens[-1] == "[SEP]" and len(cut.words) == 4
    progress = []
    capture_attention(loaded, texts, batch_size=2, progress=lambda d, n, m: progress.append((d, n)))
    assert progress[-1] == (3, 3)


# ----------------------------------------------------------------------------- examples per head


def test_typical_sentences_and_top_words():
    sents = views([previous, to_rarest], n=10)
    best = typical_sentences(sents, 0, 0, "positional(-1)", k=3)
    assert len(best) == 3 and (best["score"] == 1.0).all()
    rare = typical_sentences(sents, 0, 1, "rare-word", k=20)
    assert (rare["score"] == 1.0).all() and len(rare) == 10
    syn = typical_sentences(sents, 0, 0, "syntactic(obj:dep2head)")
    assert list(syn.columns) == ["sentence", "score", "weight", "hits", "n"] and (syn["score"] <= 1).all()
    with pytest.raises(ValueError, match="role"):
        parse_role("syntactic")
    words = [SentenceView(np.array([[[[0.1, 0.9], [0.2, 0.8]]]], dtype=np.float32), [-1, -1], ["", ""], [5, 5],
                          words=["The", "movie"])] * 2
    top = top_attended_words(words, 0, 0, k=2)
    assert top["word"].tolist() == ["movie", "the"]
    assert top["total"].tolist() == pytest.approx([1.7, 0.3]) and top["count"].tolist() == [2, 2]


def test_sentence_view_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="zipf"):
        SentenceView(np.zeros((1, 1, 2, 2)), [-1, -1], ["", ""], [5.0])


# ----------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def real_model():
    try:
        return load_model("default")
    except ModelNotPrepared:  # same encoder, random classification head: attention is unchanged
        return load_model(str(MINILM_DIR))


def test_real_model_roles_table(real_model):
    from core.data import load_data

    texts = load_data("default", split="dev").texts
    table = head_roles(real_model, texts, limit=20)
    layers, heads = len(real_model.adapter.layers), real_model.adapter.num_heads(0)
    assert len(table) == layers * heads
    assert table[["layer", "head"]].drop_duplicates().shape[0] == layers * heads
    fractions = ["confidence", "word_mass", "positional_frac", "rare_hit_rate", "rare_chance"] + [
        f"{r}_{d}{b}" for r in ("nsubj", "dobj", "amod", "advmod") for d in ("dep2head", "head2dep")
        for b in ("", "_baseline")]
    values = table[fractions].to_numpy(dtype=float)
    values = values[~np.isnan(values)]
    assert ((values >= 0) & (values <= 1 + 1e-6)).all()
    positional = table[table["positional"]]
    assert len(positional) >= 1  # MiniLM-L6 layer 0 head 2 looks one word back in >= 90% of words
    assert set(positional["positional_offset"]) <= {-1, 1}
