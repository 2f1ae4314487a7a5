"""Jane Austen's six novels from r-cran-janeaustenr's R lazy-load database.

Owns: reading `data/Rdata.rdb` without R, and joining hard-wrapped lines into
paragraphs.

Hand-written reader: no Python library on the machine reads R serialization
(rpy2 needs an R installation; pyreadr reads .rds/.RData files but not the
lazy-load `.rdb` containers). The subset needed is small:
  * `.rdb`: objects back to back, each a 4-byte big-endian uncompressed length
    followed by one zlib stream (R's `compress = TRUE` lazy-load format);
  * each stream: R serialization format "X\\n" (XDR, big-endian), version 2 or
    3, holding one character vector (STRSXP) of CHARSXP strings.
Objects that are not plain character vectors are skipped.
"""

import struct
import zlib

from tf_moe.data import cleaning
from tf_moe.data import debian

PACKAGE = "r-cran-janeaustenr"
RDB_PATH = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"

_STRSXP = 16
_CHARSXP = 9
_HAS_ATTRIBUTES = 1 << 9
_NA_LENGTH = -1


class RFormatError(ValueError):
    """The bytes are not in the subset of R serialization read here."""


def iter_rdb_streams(data):
    """Yields the decompressed payload of each object in an `.rdb` file.

    Args:
        data: bytes of the whole `.rdb` file.

    Raises:
        RFormatError: a length prefix disagrees with its zlib stream.
    """
    position = 0
    while position < len(data):
        if len(data) - position < 4:
            raise RFormatError(f"Truncated length prefix at byte {position}.")
        (length,) = struct.unpack_from(">I", data, position)
        decompressor = zlib.decompressobj()
        payload = decompressor.decompress(data[position + 4 :])
        if not decompressor.eof or len(payload) != length:
            raise RFormatError(
                f"Object at byte {position}: expected {length} bytes, "
                f"got {len(payload)} (complete stream: {decompressor.eof})."
            )
        used = len(data) - position - 4 - len(decompressor.unused_data)
        yield payload
        position += 4 + used


def read_character_vector(payload):
    """Decodes one XDR-serialized R character vector.

    Args:
        payload: bytes starting with b"X\\n".

    Returns:
        list of str, None for NA.

    Raises:
        RFormatError: not XDR, unknown version, or not a character vector.
    """
    if payload[:2] != b"X\n":
        raise RFormatError(f"Not XDR serialization: starts with {payload[:2]!r}.")
    version, _, _ = struct.unpack_from(">iii", payload, 2)
    position = 14
    if version == 3:
        (encoding_length,) = struct.unpack_from(">i", payload, position)
        position += 4 + encoding_length
    elif version != 2:
        raise RFormatError(f"Unknown R serialization version {version}.")
    (flags, length) = struct.unpack_from(">ii", payload, position)
    position += 8
    if flags & 0xFF != _STRSXP:
        raise RFormatError(f"Not a character vector: SEXP type {flags & 0xFF}.")
    strings = []
    for _ in range(length):
        (flags, size) = struct.unpack_from(">ii", payload, position)
        position += 8
        if flags & 0xFF != _CHARSXP:
            raise RFormatError(f"Expected CHARSXP, got SEXP type {flags & 0xFF}.")
        if size == _NA_LENGTH:
            strings.append(None)
            continue
        strings.append(payload[position : position + size].decode("utf-8", "replace"))
        position += size
    return strings


def join_wrapped_lines(lines):
    """Joins hard-wrapped lines into paragraphs at blank (or NA) lines."""
    paragraphs, current = [], []
    for line in lines:
        if line is None or not line.strip():
            if current:
                paragraphs.append(cleaning.normalize_whitespace(" ".join(current)))
                current = []
        else:
            current.append(line)
    if current:
        paragraphs.append(cleaning.normalize_whitespace(" ".join(current)))
    return paragraphs


def paragraphs(package_root):
    """Yields the paragraphs of every novel in the database, in file order.

    Args:
        package_root: folder where the r-cran-janeaustenr .deb was unpacked.
    """
    data = debian.tree_file(package_root, RDB_PATH).read_bytes()
    for payload in iter_rdb_streams(data):
        try:
            lines = read_character_vector(payload)
        except RFormatError:
            continue  # not a novel (no such objects in janeaustenr 1.0.0)
        # Underscores mark italics in these Project Gutenberg texts.
        for text in join_wrapped_lines(lines):
            text = text.replace("_", "")
            if text and cleaning.has_letters(text):
                yield text
