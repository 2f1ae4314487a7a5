"""HTML manuals of Debian packages: Sphinx, rustdoc, DocBook, Texinfo, AsciiDoc.

Owns: walking a manual's HTML tree and keeping the text of its `<p>`
elements, and the list of manuals the corpora read. Every generator of
these manuals writes prose paragraphs as `<p>` and code as `<pre>`, so one
reader serves them all. Parsing uses the standard library's `html.parser`;
`<pre>`, `<script>` and `<style>` content is skipped, and so are the
`_sources` (reST copies) and `translations` (non-English) sub-trees.
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
        html_root: the manual's top folder (holding `index.html`).
        package_root: the unpacked package holding it, which no symlink is
            followed out of; defaults to `html_root`.
    """
    package_root = html_root if package_root is None else package_root
    for path in _html_files(html_root, package_root):
        markup = path.read_text(encoding="utf-8", errors="replace")
        for text in html_paragraphs(markup):
            if cleaning.word_count(text) >= MIN_WORDS:
                yield text


class HtmlManual:
    """A Debian package holding an HTML manual, and its licence."""

    def __init__(self, name, package, html_path, licence):
        self.name = name
        self.package = package
        self.html_path = html_path
        self.licence = licence

    def paragraphs(self, package_root):
        return paragraphs(pathlib.Path(package_root) / self.html_path, package_root)


LINUX_DOC = HtmlManual(
    "linux_doc", "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html", "GPL-2"
)
PYTHON_DOC = HtmlManual(
    "python_doc", "python3.11-doc", "usr/share/doc/python3.11/html", "PSF-2.0"
)

# The manuals `tf_moe_lm_en_large` adds, largest first (words of `<p>` text
# before dedup, docs/data.md). Each root holds English pages only.
MORE_MANUALS = (
    HtmlManual("rust_doc", "rust-doc", "usr/share/doc/rust-doc/html", "MIT or Apache-2.0"),
    HtmlManual(
        "lilypond_doc", "lilypond-doc-html", "usr/share/doc/lilypond/html/Documentation",
        "GFDL-1.3+",
    ),
    HtmlManual(
        "postgresql_doc", "postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html",
        "PostgreSQL",
    ),
    HtmlManual(
        "sqlalchemy_doc", "python-sqlalchemy-doc", "usr/share/doc/python-sqlalchemy-doc/html",
        "MIT",
    ),
    HtmlManual(
        "scipy_doc", "python-scipy-doc", "usr/share/doc/python-scipy-doc/html", "BSD-3-Clause"
    ),
    HtmlManual(
        "pandas_doc", "python-pandas-doc", "usr/share/doc/python-pandas-doc/html", "BSD-3-Clause"
    ),
    HtmlManual("git_doc", "git-doc", "usr/share/doc/git-doc", "GPL-2"),
    HtmlManual(
        "django_doc", "python-django-doc", "usr/share/doc/python-django-doc/html", "BSD-3-Clause"
    ),
    HtmlManual("nodejs_doc", "nodejs-doc", "usr/share/doc/nodejs/api", "MIT"),
    HtmlManual("octave_doc", "octave-doc", "usr/share/doc/octave/octave.html", "GPL-3+"),
    HtmlManual("gimp_help", "gimp-help-en", "usr/share/gimp/2.0/help/en", "GFDL-1.2+"),
    HtmlManual("sphinx_doc", "sphinx-doc", "usr/share/doc/sphinx-doc/html", "BSD-2-Clause"),
)
