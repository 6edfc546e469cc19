"""Head roles on decoders: causal word-level scoring by hand, Olsson's previous-token / duplicate / induction
scores (planted patterns and a head built to look one token back), the attention capture on BPE pieces,
the roles CLI on a tiny decoder, and the real SmolLM2's induction heads."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from analysis.__main__ import main
from analysis.attention import AttentionRecord, capture_attention, readable_tokens, start_token, word_attention
from analysis.explain import explain_prediction
from analysis.heads import HeadsReport
from analysis.roles import (
    OlssonConfig,
    SentenceView,
    analyse_roles,
    previous_token_scores,
    repeat_scores,
    repeated_tokens,
    score_heads,
    top_attended_words,
    typical_sentences,
)
from core.data import load_data
from core.models import load_model
from tests.conftest import MINILM_DIR

torch.set_num_threads(1)  # 2 shared cores: one thread per process is several times faster than two under load

OLSSON_COLUMNS = ["prev_token_score", "duplicate_score", "induction_score"]
FAST = OlssonConfig(length=20, seeds=(0, 1))


# ----------------------------------------------------------------------------- causal scoring by hand


def causal_view(zipf=(5.0, 5.0, 5.0, 5.0), **kwargs) -> SentenceView:
    """4 words; w0 -amod-> w1, w3 -advmod-> w1 (w1 the root). Row argmaxes: w0 → 0, w1 → 1 (itself),
    w2 → 1 (offset -1), w3 → 1 (offset -2). The entries above the diagonal (7.0, 9.0) must be ignored."""
    a = np.array([[1.0, 7.0, 0.0, 9.0],
                  [0.3, 0.7, 0.0, 0.0],
                  [0.1, 0.6, 0.3, 9.0],
                  [0.2, 0.5, 0.1, 0.2]], dtype=np.float32)
    return SentenceView(a[None, None], heads_dep=[1, -1, -1, 1], deprels=["amod", "ROOT", "", "advmod"],
                        zipf=list(zipf), words=["old", "films", "age", "well"], causal=True, **kwargs)


def test_causal_view_zeroes_attention_above_the_diagonal():
    view = causal_view()
    assert np.triu(view.attention[0, 0], 1).max() == 0.0
    # a head that looks only at the next word has nothing left (flat zero rows make no choice)
    w = 6
    nxt = np.zeros((w, w), dtype=np.float32)
    nxt[np.arange(w - 1), np.arange(1, w)] = 1.0
    nxt[w - 1, w - 1] = 1.0
    base = dict(heads_dep=[-1] * w, deprels=[""] * w, zipf=[5.0] * w)
    encoder = score_heads([SentenceView(nxt[None, None], **base)] * 3).iloc[0]
    decoder = score_heads([SentenceView(nxt[None, None], causal=True, **base)] * 3).iloc[0]
    assert encoder["roles"] == "positional(1)"
    assert decoder["roles"] == "" and decoder["positional_frac"] == 0.0
    with pytest.raises(ValueError, match="causal"):
        score_heads([SentenceView(nxt[None, None], **base), SentenceView(nxt[None, None], causal=True, **base)])


def test_causal_positional_syntactic_and_rare_word_by_hand():
    row = score_heads([causal_view(zipf=(5.0, 1.0, 5.0, 5.0))], min_pairs=1, min_sentences=1).iloc[0]
    # offsets chosen: 0, 0, -1, -2. An encoder would report offset 0; a decoder only looks back: -1 and -2
    # tie at one word each, the tie goes to -1, and 3 words have a left neighbour.
    assert row["positional_offset"] == -1 and row["positional_frac"] == pytest.approx(1 / 3)
    assert row["confidence"] == pytest.approx((1.0 + 0.7 + 0.6 + 0.5) / 4)
    # amod w0 -> w1: the dependent comes first, so only head2dep (w1 → w0) is a pair; w1 picks itself: miss.
    assert row["amod_pairs"] == 1 and row["amod_dep2head_pairs"] == 0 and row["amod_head2dep_pairs"] == 1
    assert np.isnan(row["amod_dep2head"]) and row["amod_head2dep"] == 0.0
    # advmod w3 -> w1: only dep2head (w3 → w1) is a pair, and w3 picks w1: hit, against the -2 baseline (1/1).
    assert row["advmod_dep2head_pairs"] == 1 and row["advmod_dep2head"] == 1.0
    assert row["advmod_dep2head_baseline"] == 1.0 and row["advmod_head2dep_pairs"] == 0
    # rare-word: received = mean attention from later words, (0.3+0.1+0.2)/3, (0.6+0.5)/2, 0.1/1 for w0..w2;
    # w3 (read by none) is no candidate. w1 (zipf 1) gets the most: a hit, chance 1 of 3 candidates.
    assert row["rare_hit_rate"] == 1.0 and row["rare_chance"] == pytest.approx(1 / 3)
    words = top_attended_words([causal_view()], 0, 0)
    assert words.set_index("word")["total"].to_dict() == pytest.approx({"films": 0.55, "old": 0.2, "age": 0.1})


def test_typical_sentences_for_olsson_roles():
    """'the cat saw the dog': the second 'the' (w3) has an earlier occurrence at w0; the word after it is w1."""
    w = 5
    words = ["the", "cat", "saw", "The", "dog"]
    induct = np.tril(np.full((w, w), 0.1, dtype=np.float32))
    induct[3] = [0.1, 0.7, 0.1, 0.1, 0.0]
    dup = np.tril(np.full((w, w), 0.1, dtype=np.float32))
    dup[3] = [0.7, 0.1, 0.1, 0.1, 0.0]
    view = SentenceView(np.stack([induct, dup])[None], heads_dep=[-1] * w, deprels=[""] * w, zipf=[5.0] * w,
                        words=words, causal=True)
    got = {(h, role): typical_sentences([view], 0, h, role).iloc[0][["score", "hits", "n"]].tolist()
           for h in (0, 1) for role in ("induction", "duplicate-token")}
    assert got == {(0, "induction"): [1.0, 1, 1], (0, "duplicate-token"): [0.0, 0, 1],
                   (1, "induction"): [0.0, 0, 1], (1, "duplicate-token"): [1.0, 1, 1]}
    assert len(typical_sentences([view], 0, 0, "previous-token")) == 1


# ----------------------------------------------------------------------------- Olsson's scores, planted


def test_repeated_tokens_are_seeded_distinct_and_not_special():
    seq = repeated_tokens(100, [0, 1, 2], 10, seed=3, start=1)
    assert len(seq) == 21 and seq[0] == 1 and seq[1:11] == seq[11:]
    assert len(set(seq[1:11])) == 10 and not set(seq[1:]) & {0, 1, 2}
    assert seq == repeated_tokens(100, [0, 1, 2], 10, seed=3, start=1)
    assert seq != repeated_tokens(100, [0, 1, 2], 10, seed=4, start=1)
    bare = repeated_tokens(100, [0], 10, seed=3, start=None)
    assert len(bare) == 20 and bare[:10] == bare[10:]
    with pytest.raises(ValueError, match="distinct"):
        repeated_tokens(5, [0], 10, seed=0, start=None)


@pytest.mark.parametrize("offset", [1, 0])
def test_repeat_scores_on_planted_heads(offset):
    t = 6
    n = 2 * t + offset
    heads = np.zeros((3, n, n), dtype=np.float32)
    heads[:, :, 0] = 1.0  # everything on the first position unless planted below
    for k in range(t):
        q, earlier = offset + t + k, offset + k
        heads[:, q, 0] = 0.0
        heads[0, q, earlier] = 1.0  # duplicate: the same token earlier
        heads[1, q, earlier + 1] = 1.0  # induction: the token after it (k = t-1: the second copy's first token)
        heads[2, q, q - 1] = 1.0  # previous token
    duplicate, induction = repeat_scores(heads[None], t, offset)
    np.testing.assert_allclose(duplicate[0], [1.0, 0.0, 0.0])
    # induction averages over k = 1..T-1 (targets in the first copy); head 2's previous token is never one
    np.testing.assert_allclose(induction[0], [0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="positions"):
        repeat_scores(heads[None], t + 1, offset)


def test_previous_token_score_skips_the_start_token():
    att = np.zeros((1, 1, 5, 5), dtype=np.float32)
    att[0, 0, 1, 0] = 1.0  # first word → start token: not counted
    att[0, 0, 2, 1], att[0, 0, 3, 2], att[0, 0, 4, 3] = 0.5, 0.2, 0.9
    rec = AttentionRecord("ab c", ["<s>", "a", "b", " c", "."], [None, 0, 0, 1, 2], ["ab", "c", "."],
                          [(0, 2), (3, 4), (4, 5)], att, False, causal=True)
    empty = AttentionRecord("", ["<s>"], [None], [], [], np.zeros((1, 1, 1, 1), dtype=np.float32), False, True)
    assert previous_token_scores([rec, empty])[0, 0] == pytest.approx((0.5 + 0.2 + 0.9) / 3)
    assert np.isnan(previous_token_scores([empty])).all()


# ----------------------------------------------------------------------------- capture on tiny decoders


def test_start_token_rule(smollm2_dir):
    smol = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    assert start_token(smol, AutoConfig.from_pretrained(smollm2_dir)) == 1  # config bos: <|im_start|>
    assert start_token(smol, LlamaConfig(bos_token_id=None)) == smol.bos_token_id == 1
    bert = AutoTokenizer.from_pretrained(MINILM_DIR, local_files_only=True)
    assert start_token(bert, AutoConfig.from_pretrained(MINILM_DIR)) is None  # it adds [CLS] itself


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_capture_on_decoders_is_causal_per_query_head(arch, tiny_decoders):
    loaded = load_model(str(tiny_decoders[arch]))
    texts = ["a quietly moving film", "the actors are great but the plot is thin and the ending is silly"]
    records = capture_attention(loaded, texts, batch_size=2)
    heads = loaded.model.config.num_attention_heads
    for text, rec in zip(texts, records):
        t = len(rec.tokens)
        assert rec.causal and rec.attention.shape == (3, heads, t, t)  # query heads, not KV heads
        assert np.triu(rec.attention, 1).max() == 0.0
        np.testing.assert_allclose(rec.attention.sum(-1), 1.0, atol=1e-5)
        assert rec.tokens[0] == "<|im_start|>" and rec.word_ids[0] is None and None not in rec.word_ids[1:]
        assert "".join(rec.tokens[1:]) == text and not any("Ġ" in tok for tok in rec.tokens)
        assert rec.words == text.split() and [text[s:e] for s, e in rec.word_spans] == rec.words
        assert np.triu(rec.word_attention(), 1).max() == 0.0
    alone = capture_attention(loaded, texts[:1])[0]  # right padding in the batch changed nothing
    np.testing.assert_allclose(alone.attention, records[0].attention, atol=1e-5)
    cut = capture_attention(loaded, texts[1:], max_length=5)[0]
    assert cut.truncated and cut.tokens == records[1].tokens[:5] and cut.words == ["the", "actors", "are", "great"]


def test_word_attention_over_bpe_pieces_by_hand(tiny_decoders):
    """'The film's unbelievably good' = <|im_start|> The | Ġfilm | 's | Ġunbelie v ably | Ġgood."""
    rec = capture_attention(load_model(str(tiny_decoders["llama"])), ["The film's unbelievably good"])[0]
    assert rec.tokens == ["<|im_start|>", "The", " film", "'s", " unbelie", "v", "ably", " good"]
    assert rec.word_ids == [None, 0, 1, 2, 3, 3, 3, 4]
    assert rec.words == ["The", "film", "'s", "unbelievably", "good"]
    assert rec.word_spans == [(0, 3), (4, 8), (8, 10), (11, 23), (24, 28)]
    n = len(rec.tokens)
    uniform = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]  # token i attends 1/(i+1) to each j <= i
    got = word_attention(uniform[None, None], rec.word_ids)[0, 0]
    # from a word: mean over its pieces' rows; to a word: sum over its pieces' columns; the start token dropped
    assert got[3, 3] == pytest.approx((1 / 5 + 2 / 6 + 3 / 7) / 3)  # unbelievably → itself (pieces 4, 5, 6)
    assert got[3, 0] == pytest.approx((1 / 5 + 1 / 6 + 1 / 7) / 3)  # unbelievably → The (piece 1)
    assert got[4, 3] == pytest.approx(3 / 8)  # good (piece 7) → unbelievably
    assert got[0, 0] == pytest.approx(1 / 2) and got[0, 1] == 0.0  # The sees the start token and itself only
    assert got.sum(1) == pytest.approx([1 / 2, 2 / 3, 3 / 4, (4 / 5 + 5 / 6 + 6 / 7) / 3, 7 / 8])


def test_readable_tokens_show_the_text(smollm2_dir):
    smol = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    ids = smol("Good film.\nSee it")["input_ids"]
    assert smol.convert_ids_to_tokens(ids) == ["Good", "Ġfilm", ".", "Ċ", "See", "Ġit"]
    assert readable_tokens(smol, [1, *ids]) == ["<|im_start|>", "Good", " film", ".", "↵", "See", " it"]


# ----------------------------------------------------------------------------- a head built to look one token back


@pytest.fixture(scope="module")
def previous_head_dir(tmp_path_factory, smollm2_dir):
    """A tiny Llama whose L0H0 provably attends to the previous token: its query and key are constant
    (zero weights, bias only), so after RoPE the score depends only on the offset d = i - j, as
    s(d) = (a^2 / sqrt(8)) * sum_p cos((1 - d) theta_p) over the three fastest rotary pairs: largest at d = 1,
    more than 10 nats above every other offset up to 100 tokens."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir, local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, attention_bias=True, vocab_size=len(tokenizer),
                      max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    inv_freq = model.model.rotary_emb.inv_freq.double()
    attn, d, a = model.model.layers[0].self_attn, 8, 12.0
    q, k = torch.zeros(d), torch.zeros(d)
    for p in range(3):  # rotary pair p = dims (p, p + d/2), turned by position * inv_freq[p]
        q[p] = a
        k[p], k[p + d // 2] = a * torch.cos(inv_freq[p]), a * torch.sin(inv_freq[p])
    with torch.no_grad():  # query head 0 and KV head 0 (shared with query head 1 under GQA)
        attn.q_proj.weight[:d], attn.q_proj.bias[:d] = 0.0, q
        attn.k_proj.weight[:d], attn.k_proj.bias[:d] = 0.0, k
    folder = tmp_path_factory.mktemp("previous") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


PLAIN = ["the cat sat on the mat and the dog ran to the park", "The film's unbelievably good",
         "a quietly moving film about two old friends", "the actors are great but the plot is thin"]


def test_built_previous_token_head_scores_one(previous_head_dir):
    loaded = load_model(str(previous_head_dir))
    result = analyse_roles(loaded, PLAIN, olsson=FAST, min_sentences=1)
    table = result.table.set_index(["layer", "head"])
    assert len(table) == 2 * 4 and set(OLSSON_COLUMNS) <= set(table.columns)
    built = table.loc[(0, 0)]
    assert built["prev_token_score"] > 0.99 and "previous-token" in built["roles"].split("+")
    # on the repeated sequence its token looks one back: never at the same or the following token earlier
    assert built["duplicate_score"] < 0.01 and built["induction_score"] < 0.01
    assert "induction" not in built["roles"] and "duplicate-token" not in built["roles"]
    # word level: a one-piece word's only row looks at the previous word; "unbelievably" (3 pieces) puts 1/3
    # there and 2/3 on itself, so it chooses itself. No text has a 2-piece word (a tie).
    pieces = [np.bincount([w for w in r.word_ids if w is not None]) for r in capture_attention(loaded, PLAIN)]
    assert all(2 not in p for p in pieces)
    expected = sum((p[1:] == 1).sum() for p in pieces) / sum(len(p) - 1 for p in pieces)
    assert built["positional_offset"] == -1 and built["positional_frac"] == pytest.approx(expected)
    assert built["roles"].startswith("positional(-1)" if expected >= 0.9 else "previous-token")
    assert result.seconds["olsson"] > 0 and table.attrs["params"]["olsson"]["thresholds"]["induction"] == 0.4


def test_roles_cli_on_a_tiny_decoder_writes_olsson_columns(previous_head_dir, tmp_path, capsys):
    reviews = tmp_path / "reviews.csv"  # the decoder's labels by default are Rotten Tomatoes' fresh / rotten
    reviews.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t in PLAIN * 10 for lab in ("fresh", "rotten")))
    out = tmp_path / "roles.csv"
    # in process (a subprocess would spend most of its time importing torch and spaCy again)
    code = main(["roles", "--model", str(previous_head_dir), "--data", str(reviews), "--limit", "8", "--out", str(out)])
    assert code == 0 and f"wrote 8 rows to {out}" in capsys.readouterr().out
    table = pd.read_csv(out, keep_default_na=False, na_values=[""])
    assert len(table) == 8 and set(OLSSON_COLUMNS + ["roles", "positional_frac", "amod_head2dep_pairs"]) <= set(table)
    assert table[OLSSON_COLUMNS].stack().between(0, 1).all()
    built = table[(table["layer"] == 0) & (table["head"] == 0)].iloc[0]
    assert built["prev_token_score"] > 0.99 and "previous-token" in built["roles"]


# ----------------------------------------------------------------------------- the real SmolLM2


def test_smollm2_has_induction_and_previous_token_heads(smollm2_dir):
    loaded = load_model(str(smollm2_dir))
    texts = load_data("default", split="dev").subset(6, seed=0).texts
    result = analyse_roles(loaded, texts, olsson=OlssonConfig(length=30, seeds=(0,)))
    table = result.table
    assert len(table) == 30 * 9 and table[OLSSON_COLUMNS].stack().between(0, 1).all()
    induction = table[table["roles"].str.contains("induction")]
    assert len(induction) >= 1 and (induction["induction_score"] > 0.4).all()
    # an induction head needs an earlier layer's previous-token information: none in layer 0
    assert table.loc[table["layer"] == 0, "induction_score"].max() < 0.4 and induction["layer"].min() >= 2
    assert table["roles"].str.contains("previous-token").any()
    best = table.loc[table["induction_score"].idxmax()]
    shown = typical_sentences(result.views, int(best["layer"]), int(best["head"]), "induction", k=3)
    assert list(shown.columns) == ["sentence", "score", "weight", "hits", "n"]


# ----------------------------------------------------------------------------- why this prediction, the Heads report


@pytest.mark.parametrize("method", ["conservative", "attnlrp"])
def test_explanation_of_a_prompted_decoder(method, tiny_decoders):
    loaded = load_model(str(tiny_decoders["llama"]))
    text = "a quietly moving film"
    why = explain_prediction(loaded, text, method=method)
    with torch.inference_mode():
        logits = loaded.model(**loaded.tokenizer(text, return_tensors="pt")).logits[0]
    assert why.predicted == loaded.label_names[int(logits.argmax())] == why.explained and why.method == method
    assert why.logit == pytest.approx(float(logits.max()), abs=1e-4)  # the label word's logit at the prompt's end
    assert why.relevance.sum() + why.bias + why.absorbed == pytest.approx(why.logit, rel=1e-3, abs=1e-4)
    assert len(why.tokens) == len(why.relevance) == len(why.in_text) and not any("Ġ" in t for t in why.tokens)
    prompt = loaded.tokenizer.format(text)
    assert "".join(why.tokens) == prompt.replace("\n", "↵")  # the whole prompt, piece by piece
    assert "".join(np.array(why.tokens)[why.in_text]).strip() == text  # exactly the sentence's pieces
    other = explain_prediction(loaded, text, target=1 - int(logits.argmax()), method=method)
    assert other.explained != other.predicted and other.logit == pytest.approx(float(logits.min()), abs=1e-4)


def test_heads_report_of_a_decoder_with_attnlrp(previous_head_dir, tmp_path, capsys):
    reviews = tmp_path / "reviews.csv"
    reviews.write_text("text,label\n" + "".join(f'"{t}",{lab}\n' for t in PLAIN * 10 for lab in ("fresh", "rotten")))
    code = main(["heads", "--model", str(previous_head_dir), "--data", str(reviews), "--limit", "8",
                 "--relevance-method", "attnlrp", "--out", str(tmp_path / "report")])
    assert code == 0, capsys.readouterr().err
    report = HeadsReport.load(tmp_path / "report")
    assert len(report.table) == 8 and set(OLSSON_COLUMNS + ["relevance", "importance"]) <= set(report.table)
    assert report.meta["method"] == "attnlrp" and set(report.examples) == {f"{lay}:{h}" for lay in (0, 1)
                                                                           for h in range(4)}
    built = report.examples["0:0"]
    assert built["role"] == "positional(-1)" and built["has_role"]
    assert built["typical"] and all(t["score"] == 1.0 for t in built["typical"][:2])
