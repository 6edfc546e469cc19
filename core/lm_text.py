"""Real English text for language modelling, read from the gensim==4.4.0 wheel as a zip (never installed).

- **Lee** (`lee_background.cor`): ABC news articles, one a line. The file has 300 lines; 7 repeat an earlier
  one, so `lee_documents()` gives 293 unique articles (~360 KB). `lee_splits()` splits them by document,
  seeded, 80/10/10 into 234 / 29 / 30 (train / dev / test), with the rule every HeadLab split uses
  (`core.data.tasks.split_indices`: a permutation by `SPLIT_SEED`, floor 80% train, floor 10% dev, rest
  test). The built-in text task `lm`.
- **Wikipedia** (`enwiki-...-shortened.bz2`): 206 pages of a 2016 dump. Redirects (99), pages outside the
  article namespace (1) and disambiguation pages (lists of links) are dropped, and each remaining article
  is turned into plain prose by `strip_wiki_markup` (a documented regex pass, no gensim code): the
  out-of-domain set, `wiki_documents()`, split by document like Lee (`wiki_splits()`): the text task `wiki`.

The wheel is fetched once into the packages folder with `pip download --no-deps` (`make setup` does it;
`gensim_wheel()` does it too when it is missing).
"""

from __future__ import annotations

import bz2
import functools
import html
import re
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

from core.data.dataset import DataError
from core.data.tasks import SPLIT_SEED
from core.data.text import LMSplits, LMText, split_documents
from core.errors import ModelError
from core.messages import one_line
from core.paths import packages_dir
from core.wheels import download_wheels

GENSIM = ("gensim", "4.4.0")  # the wheel's name and version (27.8 MB, LGPL-2.1; only its test data is read)
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_MW = "{http://www.mediawiki.org/xml/export-0.10/}"  # the XML namespace of the dump


def gensim_wheel() -> Path:
    """The gensim wheel in the packages folder, fetched with `pip download --no-deps` if it is missing."""
    try:
        return download_wheels(GENSIM[:1], GENSIM[1], packages_dir())[0]
    except ModelError as exc:
        raise DataError(f"The language-modelling text is not installed ({exc}); run `make setup`.") from exc


def _read_member(member: str) -> bytes:
    wheel = gensim_wheel()
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.read(member)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise DataError(f"{wheel.name} has no readable {member} ({one_line(exc)}); delete it and run "
                        "`make setup`.") from exc


@functools.lru_cache(maxsize=1)
def lee_documents() -> tuple[str, ...]:
    """The unique, stripped, non-empty articles of `lee_background.cor`, in file order (293)."""
    lines = (line.strip() for line in _read_member(LEE_MEMBER).decode("utf-8").splitlines())
    return tuple(dict.fromkeys(line for line in lines if line))


def lee_splits(seed: int = SPLIT_SEED) -> LMSplits:
    """The Lee articles split by document, seeded 80/10/10: 234 / 29 / 30 (the built-in LM task)."""
    return split_documents(LMText("lee", lee_documents()), "Lee news articles", seed)


def wiki_splits(seed: int = SPLIT_SEED) -> LMSplits:
    """The Wikipedia articles split by document, seeded 80/10/10 (the out-of-domain text task `wiki`)."""
    return split_documents(wiki_documents(), "Wikipedia articles", seed)


# ----------------------------------------------------------------------------- Wikipedia markup
_BEFORE = [  # removed first: they may hold braces and brackets of their own
    re.compile(r"<!--[\s\S]*?-->"),  # comments
    re.compile(r"<ref[^>]*?/>", re.IGNORECASE),  # <ref name="x"/>
    re.compile(r"<ref[^>]*>[\s\S]*?</ref>", re.IGNORECASE),  # <ref>citation</ref>
    re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|nowiki)[^>]*>[\s\S]*?</\1>", re.IGNORECASE),
]
_BLOCKS = [  # (start, opening token, closing token): removed whole, nested ones included
    (re.compile(r"\{\{"), "{{", "}}"),  # templates: {{cite web|...}}, {{Infobox ...}}
    (re.compile(r"\{\|"), "{|", "|}"),  # tables
    (re.compile(r"\[\[\s*:?\s*(?:File|Image|Category|Media)\s*:", re.IGNORECASE), "[[", "]]"),  # files + captions
]
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")  # [[target]] or [[target|shown text]]
_AFTER = [  # applied in order once the blocks and links are gone
    (re.compile(r"\[(?:https?:)?//[^\s\]]+\s+([^\]]*)\]"), r"\1"),  # [http://x shown] -> shown
    (re.compile(r"\[(?:https?:)?//[^\]]*\]"), ""),  # [http://x]
    (re.compile(r"<[^>\n]*>"), ""),  # any other HTML tag (<br/>, <sup>, </div>, ...)
    (re.compile(r"'{2,}"), ""),  # two or more quotes: italic, bold
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.MULTILINE), r"\1"),  # == Heading == -> Heading
    (re.compile(r"^[*#:;]+\s*", re.MULTILINE), ""),  # list and indent markers
    (re.compile(r"^\s*[|!].*$", re.MULTILINE), ""),  # stray table rows
    (re.compile(r"^__[A-Z]+__\s*$", re.MULTILINE), ""),  # __NOTOC__ and friends
    (re.compile(r"[ \t]+"), " "),
    (re.compile(r" *\n\s*\n\s*"), "\n\n"),  # at most one empty line between paragraphs
    (re.compile(r" +\n"), "\n"),
]
_DISAMBIGUATION = re.compile(r"\{\{\s*(disambiguation|disambig|dab|geodis|hndis|surname)\s*[|}]", re.IGNORECASE)
_END_SECTIONS = re.compile(r"^=+\s*(See also|References|Notes|Footnotes|Further reading|External links|"
                           r"Bibliography|Sources|Citations)\s*=+\s*$", re.MULTILINE | re.IGNORECASE)


def _drop_blocks(text: str, start: re.Pattern, opening: str, closing: str) -> str:
    """`text` without each block that begins where `start` matches and ends at its balanced `closing`
    token (`opening` tokens inside nest). An unbalanced block is cut to the end of its line."""
    tokens = re.compile(f"{re.escape(opening)}|{re.escape(closing)}")
    kept, pos = [], 0
    while (found := start.search(text, pos)) is not None:
        kept.append(text[pos:found.start()])
        depth, end = 0, None
        for token in tokens.finditer(text, found.start()):
            depth += 1 if token.group() == opening else -1
            if depth == 0:
                end = token.end()
                break
        if end is None:  # never closed (a literal brace in the text): drop the rest of the line
            end = text.find("\n", found.start())
            end = len(text) if end < 0 else end
        pos = end
    kept.append(text[pos:])
    return "".join(kept)


def _link_text(match: re.Match) -> str:
    """What a reader sees of a wiki link: the shown text, or the target; interwiki links (xx:...) vanish."""
    target, shown = match.group(1), match.group(2)
    if shown is None and ":" in target:
        return ""  # [[de:Anarchismus]], [[wikt:word]]: not part of the prose
    return (shown if shown is not None else target.split("#")[0] or target).strip()


def strip_wiki_markup(text: str) -> str:
    """Plain prose of a MediaWiki article's source `text`.

    The pass: cut everything from the first end section on (See also, References, Notes, Further reading,
    External links, ...); drop comments, <ref> citations and <math>-like blocks; drop templates `{{...}}`,
    tables `{|...|}` and file, image and category links with their captions, each whole with whatever
    nests inside (an unbalanced one is cut to the end of its line); turn `[[target|shown]]` into "shown"
    and `[[target]]` into "target", innermost first (interwiki links vanish); keep the text of external
    links `[http://x shown]`; drop other HTML tags, bold/italic quotes, list markers and stray table
    rows; keep headings as their text on a line; unescape HTML entities; collapse spaces and blank
    lines. What is left is the article's running text (no gensim code is used).
    """
    end = _END_SECTIONS.search(text)
    text = text[:end.start()] if end else text
    for pattern in _BEFORE:
        text = pattern.sub("", text)
    for block in _BLOCKS:
        text = _drop_blocks(text, *block)
    while True:  # a link may sit in another's shown text
        text, n = _LINK.subn(_link_text, text)
        if not n:
            break
    for pattern, repl in _AFTER:
        text = pattern.sub(repl, text)
    return html.unescape(text).strip()


@functools.lru_cache(maxsize=1)
def wiki_documents() -> LMText:
    """The Wikipedia articles as plain prose (redirects, non-articles and disambiguation pages dropped)."""
    try:
        root = ET.fromstring(bz2.decompress(_read_member(WIKI_MEMBER)))
    except (OSError, ValueError, ET.ParseError) as exc:
        raise DataError(f"The Wikipedia sample in {gensim_wheel().name} is unreadable ({one_line(exc)}).") from exc
    docs, pages = [], root.findall(f"{_MW}page")
    for page in pages:
        title = page.findtext(f"{_MW}title", "")
        source = page.findtext(f"{_MW}revision/{_MW}text", "")
        if (page.findtext(f"{_MW}ns") != "0" or page.find(f"{_MW}redirect") is not None
                or "(disambiguation)" in title or _DISAMBIGUATION.search(source)):
            continue
        prose = strip_wiki_markup(source)
        if prose:
            docs.append(prose)
    return LMText("wiki", tuple(docs), f"{len(docs)} Wikipedia articles of {len(pages)} pages, markup stripped")
