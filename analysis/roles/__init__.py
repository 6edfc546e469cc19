"""Head roles: Voita et al. (2019) in `scoring` (pure, on word-level attention), Olsson et al. (2022) for
decoders in `olsson` (previous-token, duplicate-token, induction), `examples` (sentences and words per
head), `driver` (attention capture, spaCy parses, wordfreq frequencies on a real model)."""

from analysis.roles.driver import (
           SPACY_MODEL,
           RoleAnalysis,
           analyse_roles,
           build_view,
           head_roles,
           load_parser,
           word_zipf,
)
from analysis.roles.examples import parse_role, top_attended_words, typical_sentences
from analysis.roles.olsson import OlssonConfig, olsson_table, previous_token_scores, repeat_scores, repeated_tokens
from analysis.roles.scoring import DIRECTIONS, RELATIONS, SentenceView, choices, score_heads

__all__ = ["DIRECTIONS", "RELATIONS", "SPACY_MODEL", "OlssonConfig", "RoleAnalysis", "SentenceView", "analyse_roles",
           "build_view", "choices", "head_roles", "load_parser", "olsson_table", "parse_role", "previous_token_scores",
           "repeat_scores", "repeated_tokens", "score_heads", "top_attended_words", "typical_sentences", "word_zipf"]
