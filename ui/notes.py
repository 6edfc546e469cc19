"""Plain-language notes for a student beside each chart: "What am I looking at?" (one paragraph, the one
formula that matters, a pointer to the paper). Texts live here, keyed by chart; pages call `note(key)`."""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

import streamlit as st


@dataclass(frozen=True)
class Note:
    text: str  # markdown, a few sentences
    formula: str  # LaTeX for st.latex
    paper: str  # "Authors year, title"
    url: str


NOTES: dict[str, Note] = {
    "architecture": Note(
        "A transformer reads a sentence as a list of tokens (word pieces). Every layer has several attention "
        "**heads**: each head lets every token look at other tokens and copy information from them, then a "
        "feed-forward network (FFN) transforms each token on its own. Decoders (SmolLM2) look only backwards "
        "and may share keys and values between query heads (KV heads).",
        r"\mathrm{head}(X) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}}\right)V,\quad Q = XW^Q,\ K = XW^K,"
        r"\ V = XW^V",
        "Vaswani et al. 2017, Attention Is All You Need", "https://arxiv.org/abs/1706.03762"),
    "evaluation": Note(
        "How good and how fast the model is before anything is pruned: accuracy on the dev split, and the "
        "median time of one forward pass for 1 and for 32 sentences on this machine's CPU. Compute is split "
        "between attention and the FFN; with short sentences the FFN dominates.",
        r"\text{FLOPs per layer} \approx 2T\,(4d^2 + 2Td + 2d\,d_{ff})",
        "Kaplan et al. 2020, Scaling Laws (FLOP counting, sec. 2.1)", "https://arxiv.org/abs/2001.08361"),
    "predictions": Note(
        "A few dev sentences with the true label, the model's guess and how sure it is (the softmax of its "
        "logits).",
        r"p(c \mid x) = \frac{e^{f_c(x)}}{\sum_{c'} e^{f_{c'}(x)}}",
        "Devlin et al. 2019, BERT (classification head)", "https://arxiv.org/abs/1810.04805"),
    "head_heatmap": Note(
        "One square per head (rows: layers, columns: heads). With LRP relevance, the prediction's score is "
        "split backwards through the network so that the parts add up to the score; a head's share is how "
        "much of the decision passed through it, averaged over the sentences. Michel importance instead asks "
        "how much the loss would change if the head were switched off a little.",
        r"\sum_{\text{parts } i} R_i = f_c(x),\qquad r_{l,h} = \mathbb{E}_x\,\frac{|R_{l,h}(x)|}"
        r"{\sum_{l',h'} |R_{l',h'}(x)|}",
        "Voita et al. 2019, Analyzing Multi-Head Self-Attention (sec. 4)", "https://arxiv.org/abs/1905.09418"),
    "role_map": Note(
        "Heads that do a recognisable job. **Positional**: almost always looks at the word just before or "
        "after. **Syntactic**: finds a grammatical partner (subject, object, ...) better than a position "
        "guess. **Rare-word**: looks at the rarest word. Decoders add **induction** heads (after '... A B ... "
        "A' they look at B, to copy it), previous-token and duplicate-token heads. Grey: no role found.",
        r"\text{positional if } \Pr_t\big[\arg\max_j \alpha_{tj} = t + k\big] \ge 0.9",
        "Voita et al. 2019 (sec. 5); Olsson et al. 2022, In-context Learning and Induction Heads",
        "https://arxiv.org/abs/1905.09418"),
    "relevance_vs_importance": Note(
        "Each dot is a head: across, its LRP relevance; up, its Michel importance. Two different ways of "
        "asking 'does this head matter?'; heads top right matter by both. Click one to look at it below.",
        r"I_h = \mathbb{E}_x \left|\frac{\partial \mathcal{L}(x)}{\partial \xi_h}\right|,\quad"
        r" \mathrm{MHA}(x) = \sum_h \xi_h\, \mathrm{head}_h(x)\, W^O_h",
        "Michel et al. 2019, Are Sixteen Heads Really Better than One?", "https://arxiv.org/abs/1905.10650"),
    "attention": Note(
        "What one head does with one sentence. Each token on the left sends a line to the tokens it looks "
        "at on the right; a darker line is a larger attention weight. Each token's weights add up to 1. "
        "The matrix tab shows the same numbers as a grid (row: the looking token).",
        r"\alpha_{ij} = \frac{\exp(q_i \cdot k_j / \sqrt{d_k})}{\sum_{j'} \exp(q_i \cdot k_{j'} / \sqrt{d_k})}",
        "Vig 2019, A Multiscale Visualization of Attention in the Transformer Model (bertviz)",
        "https://arxiv.org/abs/1906.05714"),
    "top_words": Note(
        "Over the analysed sentences: which words receive most of this head's attention in total. A "
        "rare-word head shows unusual words here, a positional head mostly short function words.",
        r"\text{total}(w) = \sum_{\text{sentences}} \sum_{i} \alpha_{i,w}",
        "Clark et al. 2019, What Does BERT Look At?", "https://arxiv.org/abs/1906.04341"),
    "why": Note(
        "Which words pushed the model towards its answer (green) or against it (red). The explained logit is "
        "split over the input tokens with layer-wise relevance propagation; the pieces add up (nearly) to "
        "the logit, so a word's colour is its share of the decision.",
        r"R_i = x_i \cdot \frac{\partial f_c}{\partial x_i}\ \text{(attention held fixed)},\qquad \sum_i R_i "
        r"\approx f_c(x)",
        "Ali et al. 2022, XAI for Transformers; Achtibat et al. 2024, AttnLRP", "https://arxiv.org/abs/2202.07304"),
    "gate_grid": Note(
        "Every head has a switch (a gate). Closing a head multiplies its output by 0; the model is then "
        "physically cut smaller (the head's weights are removed) and measured again. Voita and Michel found "
        "that many heads can go with little loss in accuracy.",
        r"\mathrm{MHA}(x) = \sum_{h} z_h\, \mathrm{head}_h(x)\, W^O_h,\qquad z_h \in \{0, 1\}",
        "Voita et al. 2019; Xia et al. 2022, CoFi (structured pruning)", "https://arxiv.org/abs/2204.00408"),
    "live_figures": Note(
        "Accuracy of the pruned copy on a fixed subset of dev sentences, and its speed timed against the "
        "dense model in turns. Sparsity counts the removed weights of the layers; speed follows FLOPs only "
        "roughly on a CPU, so both are shown.",
        r"\text{sparsity} = 1 - \frac{\#\text{weights kept}}{\#\text{prunable weights}},\qquad "
        r"\text{speedup} = \frac{t_\text{dense}}{t_\text{pruned}}",
        "Xia et al. 2022, CoFi (sec. 2, sparsity)", "https://arxiv.org/abs/2204.00408"),
    "history": Note(
        "Each change you made this session is a point: further left is faster, higher is more accurate. "
        "A good pruning keeps the line flat while it moves left.",
        r"\Delta\text{acc} = \text{acc}_\text{pruned} - \text{acc}_\text{dense}",
        "Michel et al. 2019 (fig. 3, accuracy as heads go)", "https://arxiv.org/abs/1905.10650"),
    "run_curves": Note(
        "A training run learns which parts to remove: every unit has a learnable gate, and a penalty pushes "
        "the expected model size towards the target sparsity while the task loss keeps accuracy. The "
        "curves are measured at each eval step.",
        r"\mathcal{L} = \mathcal{L}_\text{task} + \lambda_1(\hat s - t) + \lambda_2(\hat s - t)^2",
        "Xia et al. 2022, CoFi (sec. 3.2, Lagrangian)", "https://arxiv.org/abs/2204.00408"),
    "run_gates": Note(
        "The head gates of a run at one step. A gate is a 'hard-concrete' random switch: during training it "
        "is a noisy value between 0 and 1 whose chance of being open is learned; at eval time it is fixed "
        "and closed heads (✕) are cut out.",
        r"z = \min\!\big(1, \max\!\big(0,\ \sigma\big((\log u - \log(1-u) + \log\alpha)/\beta\big)(\zeta-\gamma)"
        r" + \gamma\big)\big)",
        "Louizos et al. 2018, Learning Sparse Neural Networks through L0 Regularization",
        "https://arxiv.org/abs/1712.01312"),
    "pareto": Note(
        "Each finished run is a point: accuracy against measured speedup. A run is on its method's frontier "
        "(dotted line) when no other run of that method is both faster and more accurate. The star is the "
        "dense teacher at 1×.",
        r"\text{run } a \text{ dominates } b \iff \text{speed}_a \ge \text{speed}_b \wedge \text{acc}_a \ge "
        r"\text{acc}_b",
        "Xia et al. 2022, CoFi (fig. 2, accuracy vs speedup)", "https://arxiv.org/abs/2204.00408"),
}


def note(key: str, where=None) -> None:
    """The "What am I looking at?" expander of chart `key` (a key of NOTES) in `where` (default: the page)."""
    item = NOTES[key]
    with (where or st).expander("What am I looking at?"):
        # HTML, not markdown: the pages' own markdown and captions keep their places (tests index them)
        st.html(f"<p>{_bold(item.text)}</p>")
        st.latex(item.formula)
        st.html(f'<p style="font-size:0.85em">Paper: <a href="{html.escape(item.url)}" target="_blank">'
                f"{html.escape(item.paper)}</a></p>")


def _bold(text: str) -> str:
    """`text` escaped for HTML, with its markdown **bold** spans kept bold."""
    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))
