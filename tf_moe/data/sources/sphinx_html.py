"""Sphinx-generated HTML manuals: linux-doc-6.1 and python3.11-doc.

Owns: walking a Sphinx HTML tree and keeping the text of its `<p>` elements.
Parsing uses the standard library's `html.parser`; `<pre>`, `<script>` and
`<style>` content is skipped, and so are the `_sources` (reST copies) and
`translations` (non-English) sub-trees.
"""

import html.parser
import pathlib

from tf_moe.data import cleaning
from tf_moe.data import debian

# Paragraphs of fewer words are captions, version notes and link lists.
MIN_WORDS = 8
_SKIP_DIRS = frozenset({"_sources", "translations", "_static", "_images", "_downloads"})
_SKIP_CONTENT = frozenset({"pre", "script", "style"})


class _ParagraphParser(html.parser.HTMLParser):
    """Collects the text of each outermost `<p>`, minus skipped elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.paragraphs = []
        self._p_depth = 0
        self._skip_depth = 0
        self._parts = []

    def handle_starttag(self, tag, attrs):
        if tag == "p":
            self._p_depth += 1
        elif tag in _SKIP_CONTENT:
            self._skip_depth += 1

    def handle_endtag(self, tag):
        if tag == "p" and self._p_depth:
            self._p_depth -= 1
            if not self._p_depth:
                self.paragraphs.append("".join(self._parts))
                self._parts = []
        elif tag in _SKIP_CONTENT and self._skip_depth:
            self._skip_depth -= 1

    def handle_data(self, data):
        if self._p_depth and not self._skip_depth:
            self._parts.append(data)


def html_paragraphs(markup):
    """The whitespace-normalized text of each `<p>` in an HTML string."""
    parser = _ParagraphParser()
    parser.feed(markup)
    parser.close()
    return [cleaning.normalize_whitespace(p) for p in parser.paragraphs]


def _html_files(html_root, package_root):
    # Never through symlinks out of the package tree (`debian.tree_files`).
    folder = pathlib.Path(html_root).relative_to(package_root)
    files = []
    for path in debian.tree_files(package_root, folder, "*.html"):
        relative = path.relative_to(html_root)
        if _SKIP_DIRS.isdisjoint(relative.parts[:-1]):
            files.append(path)
    # Sorted: the order decides which copy of a duplicate is kept.
    return sorted(files, key=lambda p: p.relative_to(html_root).as_posix())


def paragraphs(html_root, package_root=None):
    """Yields the cleaned paragraphs of every page under `html_root`.

    Args:
        html_root: the Sphinx output folder (holding `index.html`).
        package_root: the unpacked package holding it, which no symlink is
            followed out of; defaults to `html_root`.
    """
    package_root = html_root if package_root is None else package_root
    for path in _html_files(html_root, package_root):
        markup = path.read_text(encoding="utf-8", errors="replace")
        for text in html_paragraphs(markup):
            if cleaning.word_count(text) >= MIN_WORDS:
                yield text


class SphinxManual:
    """A Debian package holding a Sphinx HTML manual."""

    def __init__(self, name, package, html_path):
        self.name = name
        self.package = package
        self.html_path = html_path

    def paragraphs(self, package_root):
        return paragraphs(pathlib.Path(package_root) / self.html_path, package_root)


LINUX_DOC = SphinxManual(
    "linux_doc", "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html"
)
PYTHON_DOC = SphinxManual(
    "python_doc", "python3.11-doc", "usr/share/doc/python3.11/html"
)
