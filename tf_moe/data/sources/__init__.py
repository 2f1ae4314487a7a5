"""Extractors for the Debian packages the built-in corpora are made from.

Owns: the list of sources of each corpus. Each source names the Debian
packages it reads and a `read(roots)` function, where `roots` maps each
package name to the folder its .deb was unpacked into (`dpkg-deb -x`), and
yields cleaned texts (English) or (english, german) pairs (parallel).
Does not own: fetching packages (`tf_moe.data.debian`), deduplication and
splitting (`tf_moe.data.corpus`).
Every reader lists and opens a package's files through `debian.tree_files`
and `debian.tree_file`, which never follow a symlink out of the package's
unpacked tree.
"""

import functools
from typing import Callable, NamedTuple, Tuple

from tf_moe.data.sources import gcide
from tf_moe.data.sources import gettext_catalogs
from tf_moe.data.sources import janeausten
from tf_moe.data.sources import libreoffice_help
from tf_moe.data.sources import html_manuals
from tf_moe.data.sources import sword


class Source(NamedTuple):
    """One corpus source.

    Attributes:
        name: short name used in statistics.
        packages: Debian package names it reads.
        read: `read(roots) -> Iterator`, `roots` a dict package -> folder.
        licence: licence of the text, for the documentation and metadata.
    """

    name: str
    packages: Tuple[str, ...]
    read: Callable
    licence: str


def _single(function, package):
    return lambda roots: function(roots[package])


def _help_pairs(roots, language):
    return libreoffice_help.paragraph_pairs(
        roots[libreoffice_help.ENGLISH_PACKAGE],
        roots[libreoffice_help.package_for(language)],
        language,
    )


def _ui_pairs(roots, language):
    return gettext_catalogs.ui_string_pairs(
        roots[gettext_catalogs.package_for(language)], language
    )


def _manual(manual):
    return Source(
        manual.name, (manual.package,), _single(manual.paragraphs, manual.package),
        manual.licence,
    )


ENGLISH_SOURCES = (
    Source("gcide", (gcide.PACKAGE,), _single(gcide.paragraphs, gcide.PACKAGE), "GPL-2+"),
    _manual(html_manuals.LINUX_DOC),
    _manual(html_manuals.PYTHON_DOC),
    Source(
        "austen",
        (janeausten.PACKAGE,),
        _single(janeausten.paragraphs, janeausten.PACKAGE),
        "MIT (novels in the public domain)",
    ),
    Source("web_bible", (sword.PACKAGE,), _single(sword.paragraphs, sword.PACKAGE), "public domain"),
)

# The built-in corpus first, so that dedup keeps every one of its texts (and
# the hash split puts each in the same split): lm_en is a subset of lm_en_large.
LARGE_ENGLISH_SOURCES = ENGLISH_SOURCES + tuple(
    _manual(manual) for manual in html_manuals.MORE_MANUALS
)


def parallel_sources(language):
    """Sources of (english, `language`) pairs, e.g. language="de"."""
    return (
        Source(
            "libreoffice_help",
            (libreoffice_help.ENGLISH_PACKAGE, libreoffice_help.package_for(language)),
            functools.partial(_help_pairs, language=language),
            "MPL-2.0",
        ),
        Source(
            "libreoffice_ui",
            (gettext_catalogs.package_for(language),),
            functools.partial(_ui_pairs, language=language),
            "MPL-2.0",
        ),
    )


def packages_of(sources):
    """Sorted, unique package names that `sources` read."""
    return sorted({package for source in sources for package in source.packages})
