"""World English Bible from sword-text-web's SWORD zText module.

Owns: reading a zText module's indexes and blocks, stripping its OSIS markup
and cutting the text into the module's own paragraphs.

Hand-written index reader: the only SWORD readers (libsword and its Python
bindings) would need installing, which the corpus rules forbid; the format is
three small files per testament (`ot.*`, `nt.*`):
  * `.bzs` block index: per block, little-endian uint32 offset, compressed
    size and uncompressed size into `.bzz`;
  * `.bzz`: zlib-compressed blocks (CompressType=ZIP);
  * `.bzv` verse index: per verse slot, little-endian uint32 block number,
    uint32 offset and uint16 size inside the uncompressed block (size 0 for
    empty slots).
The OSIS markup inside verses is parsed with the standard `html.parser`.
"""

import html.parser
import pathlib
import struct
import zlib

from tf_moe.data import cleaning
from tf_moe.data import debian

PACKAGE = "sword-text-web"
MODULE_PATH = "usr/share/sword/modules/texts/ztext/engWEB2015eb"
TESTAMENTS = ("ot", "nt")

_BLOCK_ENTRY = struct.Struct("<III")
_VERSE_ENTRY = struct.Struct("<IIH")
# Elements whose content is not running text: footnotes, cross references,
# headings.
_SKIP_CONTENT = frozenset({"note", "title"})
# Milestones and elements that start a new paragraph.
_BREAK_TAGS = frozenset({"chapter", "lg"})
_BREAK_TYPES = frozenset({"x-p", "book", "introduction"})


def read_verses(module_root, testament, package_root=None):
    """Yields the raw OSIS text of each non-empty verse slot, in order.

    Args:
        module_root: the zText module folder (holding ot.bzs, ...).
        testament: "ot" or "nt".
        package_root: the unpacked package holding the module; the index
            files are not read through symlinks leaving it (`debian.tree_file`).
            Defaults to `module_root`.
    """
    package_root = module_root if package_root is None else package_root
    module = pathlib.Path(module_root).relative_to(package_root)

    def read(suffix):
        path = debian.tree_file(package_root, module / f"{testament}.{suffix}")
        return path.read_bytes()

    block_index, verse_index, compressed = read("bzs"), read("bzv"), read("bzz")
    blocks = {}
    for block, start, size in _VERSE_ENTRY.iter_unpack(verse_index):
        if not size:
            continue
        if block not in blocks:
            offset, stored, expanded = _BLOCK_ENTRY.unpack_from(
                block_index, block * _BLOCK_ENTRY.size
            )
            blocks[block] = zlib.decompress(compressed[offset : offset + stored])
            if len(blocks[block]) != expanded:
                raise ValueError(
                    f"{testament}.bzz block {block}: expected {expanded} bytes, "
                    f"got {len(blocks[block])}."
                )
        yield blocks[block][start : start + size].decode("utf-8", "replace")


class _OsisParser(html.parser.HTMLParser):
    """Plain text of OSIS fragments, cut at paragraph milestones."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs = []
        self._parts = []
        self._skip_depth = 0

    def _break(self):
        text = cleaning.normalize_whitespace("".join(self._parts))
        if text:
            self.paragraphs.append(text)
        self._parts = []

    def _is_break(self, tag, attrs):
        return tag in _BREAK_TAGS or dict(attrs).get("type") in _BREAK_TYPES

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_CONTENT:
            self._skip_depth += 1
        elif self._is_break(tag, attrs) and not self._skip_depth:
            self._break()

    def handle_startendtag(self, tag, attrs):
        if self._is_break(tag, attrs) and not self._skip_depth:
            self._break()

    def handle_endtag(self, tag):
        if tag in _SKIP_CONTENT and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data):
        if not self._skip_depth:
            self._parts.append(data)

    def close(self):
        super().close()
        self._break()


def osis_paragraphs(verses):
    """Paragraph texts of a sequence of OSIS verse fragments."""
    parser = _OsisParser()
    for verse in verses:
        parser.feed(verse)
        parser.feed(" ")
    parser.close()
    return parser.paragraphs


def paragraphs(package_root):
    """Yields the Bible's paragraphs, Old then New Testament.

    Args:
        package_root: folder where the sword-text-web .deb was unpacked.
    """
    module_root = pathlib.Path(package_root) / MODULE_PATH
    for testament in TESTAMENTS:
        verses = read_verses(module_root, testament, package_root)
        for text in osis_paragraphs(verses):
            if cleaning.has_letters(text):
                yield text
