"""Text corpora for calibration and evaluation, split so the two parts never overlap.

The default corpus is the English Wikipedia sample shipped in the gensim 4.4.0 wheel (about
3 MB of article text once the wiki markup is removed). Articles are assigned whole to the
calibration or the evaluation part by a hash of their title, so the split is deterministic and
no text is shared. A plain-text file is split the same way by paragraph; ``wikitext2`` uses the
dataset's own train/test splits (needs the ``datasets`` package and internet).
"""

from __future__ import annotations

import bz2
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from allocator.errors import BitallocError
from allocator.storage import is_file, shown

ENWIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DEFAULT_CORPUS = "enwiki"
EVALUATION_SHARE = 0.25
"""Fraction of articles (or paragraphs) that go to the evaluation part."""
MIN_PARAGRAPH_WORDS = 8
"""Shorter lines are table cells, captions and list debris, not running text."""


@dataclass(frozen=True)
class Corpus:
    name: str
    calibration: str
    evaluation: str


BUILTIN_CORPORA = ("enwiki", "wikitext2", "wikitext-2")


def check_corpus(spec: str) -> None:
    """What :func:`load_corpus` would refuse first about ``spec`` without reading it: a name that is
    neither built in nor an existing file (for the commands to check before a model loads)."""
    if spec not in BUILTIN_CORPORA and not is_file(Path(spec).expanduser(), "--corpus"):
        raise BitallocError(f"unknown corpus {shown(spec)!r}: use enwiki, wikitext2, or a path to a text file")


def load_corpus(spec: str = DEFAULT_CORPUS) -> Corpus:
    """``enwiki`` (built in), ``wikitext2`` (online), or a path to a UTF-8 text file."""
    check_corpus(spec)
    if spec == "enwiki":
        return _split_documents("enwiki", _enwiki_articles())
    if spec in ("wikitext2", "wikitext-2"):
        return _wikitext2()
    path = Path(spec).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BitallocError(f"{shown(spec)} is not UTF-8 text") from None
    except OSError as exc:
        raise BitallocError(f"cannot read corpus {shown(spec)}: {exc.strerror or type(exc).__name__}") from None
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) < 2:
        raise BitallocError(f"{spec} needs at least two paragraphs (blank-line separated) to split")
    return _split_documents(path.name, [(str(i), p) for i, p in enumerate(paragraphs)])


def _in_evaluation(key: str) -> bool:
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") / 2**32
    return bucket < EVALUATION_SHARE


def _split_documents(name: str, documents: list[tuple[str, str]]) -> Corpus:
    calibration = [text for key, text in documents if not _in_evaluation(key)]
    evaluation = [text for key, text in documents if _in_evaluation(key)]
    if not calibration or not evaluation:
        raise BitallocError(f"corpus {name} is too small to split into calibration and evaluation parts")
    return Corpus(name, "\n\n".join(calibration), "\n\n".join(evaluation))


def _enwiki_articles() -> list[tuple[str, str]]:
    """(title, clean text) of every real article in gensim's Wikipedia sample, in file order."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError:
        raise BitallocError("the enwiki corpus needs gensim==4.4.0 (pip install gensim==4.4.0)") from None
    path = Path(gensim.__file__).parent / "test" / "test_data" / ENWIKI_SAMPLE
    if not path.is_file():
        raise BitallocError(f"gensim's Wikipedia sample is missing ({path}); install gensim==4.4.0")
    articles = []
    with bz2.open(path, "rb") as handle:
        for title, markup, _page_id in extract_pages(handle, filter_namespaces=("0",)):
            if markup.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wiki_text(filter_wiki(markup))
            if text:
                articles.append((title, text))
    return articles


def clean_wiki_text(text: str) -> str:
    """Plain paragraphs from gensim's ``filter_wiki`` output (which keeps quotes and headings)."""
    text = re.sub(r"'{2,}", "", text)  # bold/italic quote markup
    paragraphs = []
    for line in text.splitlines():
        line = re.sub(r"\s+", " ", line).strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            paragraphs.append(heading.group(2))
        elif len(line.split()) >= MIN_PARAGRAPH_WORDS:
            paragraphs.append(line)
    # Drop headings left without a paragraph after them.
    long_enough = [len(p.split()) >= MIN_PARAGRAPH_WORDS for p in paragraphs]
    kept = [p for i, p in enumerate(paragraphs) if long_enough[i] or (i + 1 < len(paragraphs) and long_enough[i + 1])]
    return "\n\n".join(kept)


def _wikitext2() -> Corpus:
    try:
        from datasets import load_dataset
    except ImportError:
        raise BitallocError("the wikitext2 corpus needs the datasets package (pip install datasets) and internet") from None
    try:
        data = load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception as exc:  # datasets raises many types when offline
        raise BitallocError(f"could not load wikitext-2 (offline?): {str(exc).splitlines()[0]}") from None
    return Corpus("wikitext2", "".join(data["train"]["text"]), "".join(data["test"]["text"]))
