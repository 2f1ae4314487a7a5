"""Text normalization shared by every corpus source.

Owns: whitespace normalization, the dedup key of a text, a rule-based
sentence splitter and word counting. Does not own: format-specific markup
stripping (each module under `sources/` does its own).
"""

import re
import unicodedata

_WHITESPACE = re.compile(r"\s+")
# A sentence ends at . ! ? (optionally followed by closing quotes or brackets)
# when whitespace and an upper-case letter, digit or opening quote follow.
# No offline sentence splitter model ships with the installed packages (nltk's
# punkt needs a data download), so this is a plain rule; it errs on the side
# of not splitting ("e.g. Foo" splits, "e.g. foo" does not).
_SENTENCE_END = re.compile(
    r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9\u00c0-\u00de])"
)
_LETTER = re.compile(r"[^\W\d_]")


def normalize_whitespace(text):
    """NFC-normalizes `text`, collapses whitespace runs to one space, strips.

    Args:
        text: str.

    Returns:
        str with no leading, trailing or repeated whitespace; non-breaking
        and zero-width spaces count as whitespace.
    """
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\u200b", " ").replace("\ufeff", " ")
    return _WHITESPACE.sub(" ", text).strip()


def dedup_key(text):
    """The key two texts share iff they count as duplicates.

    Case-folded, whitespace-normalized text: "The  Cat." and "the cat." are
    duplicates; punctuation still matters.
    """
    return normalize_whitespace(text).casefold()


def split_sentences(text):
    """Splits normalized `text` into sentences with a punctuation rule.

    Returns:
        list of non-empty str; joining them with " " gives back `text` when
        `text` is whitespace-normalized.
    """
    text = normalize_whitespace(text)
    if not text:
        return []
    # re.split with a zero-width-capable pattern: keep the closing quotes with
    # the sentence they end.
    sentences = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        end = match.start() + len(match.group(0).rstrip())
        sentences.append(text[start:end])
        start = match.end()
    sentences.append(text[start:])
    return [s for s in sentences if s]


def word_count(text):
    """Number of whitespace-separated words in `text` (like `wc -w`)."""
    return len(text.split())


def has_letters(text):
    """Whether `text` holds at least one letter (any script)."""
    return _LETTER.search(text) is not None
