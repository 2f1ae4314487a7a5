"""Deduplication and deterministic train/validation/test splitting.

Owns: turning the texts (or pairs) that `sources` yield into split examples,
and the per-source statistics. Deduplication runs over all sources in a
fixed order BEFORE splitting, so a repeated text can only be kept once and
so is in one split only:
  * language modelling: an example is a paragraph. Sentences of at least
    `min_sentence_words` words that were already kept are cut out of later
    paragraphs, and a paragraph whose (remaining) text was already kept is
    dropped. No sentence of that length, and no whole paragraph, is in two
    examples.
  * translation: a paragraph pair becomes sentence pairs when both sides
    split into the same number of sentences, else it stays one pair. A pair
    is dropped when its English or German text was already kept, or when
    one of its English sentences of at least `min_sentence_words` words was.
The split of a kept example is a stable function of its normalized
(English) text: SHA-256, so it does not change with Python's hash seed, the
machine, or the order sources are read in.
"""

import collections
import hashlib

from tf_moe.data import cleaning

SPLITS = ("train", "validation", "test")


def split_of(text, validation_fraction, test_fraction):
    """The split `text` belongs to, from a hash of its dedup key.

    Args:
        text: str.
        validation_fraction: float in [0, 1).
        test_fraction: float in [0, 1); validation + test < 1.

    Returns:
        "train", "validation" or "test".
    """
    digest = hashlib.sha256(cleaning.dedup_key(text).encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    if unit < test_fraction:
        return "test"
    if unit < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _check_fractions(validation_fraction, test_fraction):
    for name, value in (
        ("validation_fraction", validation_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1). Received: {name}={value}")
    if validation_fraction + test_fraction >= 1.0:
        raise ValueError(
            "validation_fraction + test_fraction must be < 1. Received: "
            f"validation_fraction={validation_fraction}, test_fraction={test_fraction}"
        )


class _SourceStats:
    def __init__(self):
        self.read_examples = 0
        self.read_words = 0
        self.kept_examples = 0
        self.kept_words = 0

    def as_dict(self):
        return dict(vars(self))


def _empty_split_stats():
    return {split: {"examples": 0, "words": 0} for split in SPLITS}


def build_lm_splits(
    sources, roots, validation_fraction, test_fraction, min_sentence_words=6
):
    """Reads, deduplicates and splits the texts of English `sources`.

    Args:
        sources: sequence of `sources.Source` yielding str.
        roots: {package: unpacked folder} covering every source's packages.
        validation_fraction, test_fraction: expected split fractions.
        min_sentence_words: sentences at least this long are deduplicated
            across paragraphs (shorter ones only as whole paragraphs).

    Returns:
        (splits, stats): splits maps "train"/"validation"/"test" to lists of
        str; stats is a JSON-able dict with "sources" (per source: read and
        kept examples and words) and "splits" (examples and words).
    """
    _check_fractions(validation_fraction, test_fraction)
    splits = {split: [] for split in SPLITS}
    stats = {"sources": {}, "splits": _empty_split_stats()}
    seen_sentences, seen_paragraphs = set(), set()
    for source in sources:
        source_stats = _SourceStats()
        for text in source.read(roots):
            source_stats.read_examples += 1
            source_stats.read_words += cleaning.word_count(text)
            kept = []
            for sentence in cleaning.split_sentences(text):
                if cleaning.word_count(sentence) >= min_sentence_words:
                    key = cleaning.dedup_key(sentence)
                    if key in seen_sentences:
                        continue
                    seen_sentences.add(key)
                kept.append(sentence)
            text = " ".join(kept)
            key = cleaning.dedup_key(text)
            if not text or key in seen_paragraphs:
                continue
            seen_paragraphs.add(key)
            split = split_of(text, validation_fraction, test_fraction)
            splits[split].append(text)
            words = cleaning.word_count(text)
            source_stats.kept_examples += 1
            source_stats.kept_words += words
            stats["splits"][split]["examples"] += 1
            stats["splits"][split]["words"] += words
        stats["sources"][source.name] = source_stats.as_dict()
    return splits, stats


def sentence_pairs(english, foreign):
    """Sentence pairs of a paragraph pair when both sides split alike.

    Returns:
        list of (english, foreign) sentence pairs if both sides split into
        the same number of sentences, else [(english, foreign)].
    """
    english_sentences = cleaning.split_sentences(english)
    foreign_sentences = cleaning.split_sentences(foreign)
    if len(english_sentences) == len(foreign_sentences) and english_sentences:
        return list(zip(english_sentences, foreign_sentences))
    return [(cleaning.normalize_whitespace(english), cleaning.normalize_whitespace(foreign))]


def build_translation_splits(
    sources, roots, validation_fraction, test_fraction, min_sentence_words=6
):
    """Reads, deduplicates and splits the pairs of parallel `sources`.

    Args:
        sources: sequence of `sources.Source` yielding (english, foreign).
        roots, validation_fraction, test_fraction, min_sentence_words: as in
            `build_lm_splits`.

    Returns:
        (splits, stats): splits maps each split to a list of (english,
        foreign) pairs; stats as in `build_lm_splits`, words counted on the
        English side plus "foreign_words".
    """
    _check_fractions(validation_fraction, test_fraction)
    splits = {split: [] for split in SPLITS}
    stats = {"sources": {}, "splits": _empty_split_stats()}
    seen_english, seen_foreign = set(), set()
    for source in sources:
        source_stats = _SourceStats()
        counts = collections.Counter()
        for paragraph_pair in source.read(roots):
            for english, foreign in sentence_pairs(*paragraph_pair):
                source_stats.read_examples += 1
                source_stats.read_words += cleaning.word_count(english)
                english_key = cleaning.dedup_key(english)
                foreign_key = cleaning.dedup_key(foreign)
                long_sentences = [
                    cleaning.dedup_key(s)
                    for s in cleaning.split_sentences(english)
                    if cleaning.word_count(s) >= min_sentence_words
                ]
                if (
                    english_key in seen_english
                    or foreign_key in seen_foreign
                    or any(key in seen_english for key in long_sentences)
                ):
                    continue
                seen_english.add(english_key)
                seen_english.update(long_sentences)
                seen_foreign.add(foreign_key)
                split = split_of(english, validation_fraction, test_fraction)
                splits[split].append((english, foreign))
                words = cleaning.word_count(english)
                source_stats.kept_examples += 1
                source_stats.kept_words += words
                counts["foreign_words"] += cleaning.word_count(foreign)
                stats["splits"][split]["examples"] += 1
                stats["splits"][split]["words"] += words
        stats["sources"][source.name] = {**source_stats.as_dict(), **counts}
    return splits, stats
