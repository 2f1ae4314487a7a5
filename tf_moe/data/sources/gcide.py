"""GCIDE (GNU Collaborative International Dictionary of English), dict-gcide.

Owns: reading `gcide.dict.dz` and turning dictionary entries into prose.
The file is dictd's "dictzip" format, which is gzip with an extra header
field, so `gzip` reads it. Entries are separated by blank lines; an entry's
head line (word, pronunciation, part of speech, etymology) starts in column 0;
senses, quotations and notes are indented. Each blank-line-separated block
becomes one paragraph after:
  * dropping `[...]` spans (etymologies, `[1913 Webster]`, `[Obs.]`),
  * dropping column-0 head lines and `\\pro*nun"ci*a`tion\\` spans,
  * dropping `--Author.` citations (from `--` to the end of the line),
  * keeping the text of `{...}` markup without the braces,
  * dropping leading sense numbers (`1.`, `(a)`) and `Syn:`-style labels' markup.
"""

import gzip
import re

from tf_moe.data import cleaning
from tf_moe.data import debian

PACKAGE = "dict-gcide"
DICT_PATH = "usr/share/dictd/gcide.dict.dz"

# Blocks of fewer words are head words, cross references and the like.
MIN_WORDS = 4

_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\")
_CITATION = re.compile(r"--\s?[A-Z(].*$", re.MULTILINE)
_BRACES = re.compile(r"[{}]")
_SENSE_NUMBER = re.compile(r"^\s*(?:\d+\.|\([a-z]\))\s+")
_LABEL = re.compile(r"^(?:Syn|Usage|Note|Ant):\s*")


def _strip_nested_brackets(text):
    # Nested brackets ([F. abus, [L.] abusus]) are removed innermost first.
    previous = None
    while previous != text:
        previous = text
        text = _BRACKETS.sub(" ", text)
    return text


def clean_block(block):
    """One dictionary block (lines between blank lines) as a paragraph.

    Args:
        block: str, the raw lines of one block.

    Returns:
        str, the cleaned, whitespace-normalized paragraph ("" if nothing is
        left).
    """
    block = _strip_nested_brackets(block)
    lines = [line for line in block.split("\n") if line.startswith(" ")]
    text = "\n".join(lines)
    text = _PRONUNCIATION.sub(" ", text)
    text = _CITATION.sub(" ", text)
    text = _BRACES.sub("", text)
    text = cleaning.normalize_whitespace(text)
    text = _SENSE_NUMBER.sub("", text)
    text = _LABEL.sub("", text)
    return text


def paragraphs(package_root):
    """Yields the cleaned GCIDE paragraphs, in file order.

    Args:
        package_root: folder where the dict-gcide .deb was unpacked.
    """
    path = debian.tree_file(package_root, DICT_PATH)
    # A few bytes are cp1252 punctuation inside an otherwise UTF-8 file;
    # they are replaced and dropped.
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        raw = f.read().replace("\ufffd", "")
    for block in re.split(r"\n[ \t]*\n", raw):
        text = clean_block(block)
        if cleaning.word_count(text) >= MIN_WORDS and cleaning.has_letters(text):
            yield text
