"""English-German paragraph pairs from the LibreOffice offline help.

Owns: pairing libreoffice-help-en-us with libreoffice-help-<lang> pages.
Every language's copy of a help page uses the same element ids
(`<p id="par_id...">`, `<h2 id="hd_id...">`), so paragraphs pair exactly by
(page path, id). Pages are parsed with the standard `html.parser`.
"""

import html.parser
import pathlib
import re

from tf_moe.data import cleaning
from tf_moe.data import debian

ENGLISH_PACKAGE = "libreoffice-help-en-us"
HELP_PATH = "usr/share/libreoffice/help"
ENGLISH_TAG = "en-US"
_ID = re.compile(r"^(?:par|hd)_id")
_SKIP_CONTENT = frozenset({"script", "style", "pre"})


def package_for(language):
    """Debian package holding the help in `language` (e.g. "de")."""
    return f"libreoffice-help-{language.lower()}"


class _IdParagraphParser(html.parser.HTMLParser):
    """Text of each element whose id is par_id*/hd_id*, keyed by id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.texts = {}
        # Open elements as [tag, id or None]; text goes to every open id.
        self._open = []
        self._parts = {}
        self._skip_depth = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP_CONTENT:
            self._skip_depth += 1
        element_id = dict(attrs).get("id") or ""
        if _ID.match(element_id) and element_id not in self.texts:
            self._parts.setdefault(element_id, [])
            self._open.append([tag, element_id])
        else:
            self._open.append([tag, None])

    def handle_startendtag(self, tag, attrs):
        pass  # <br/>, <img/>: no text, nothing to close

    def handle_endtag(self, tag):
        if tag in _SKIP_CONTENT and self._skip_depth:
            self._skip_depth -= 1
        # Close up to the most recent open element with this tag; unclosed
        # inner elements (HTML void tags such as <br>) are dropped with it.
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index][0] == tag:
                for _, element_id in self._open[index:]:
                    if element_id is not None and element_id in self._parts:
                        parts = self._parts.pop(element_id)
                        self.texts.setdefault(element_id, "".join(parts))
                del self._open[index:]
                return

    def handle_data(self, data):
        if self._skip_depth:
            return
        for _, element_id in self._open:
            if element_id is not None and element_id in self._parts:
                self._parts[element_id].append(data)


def page_paragraphs(markup):
    """{id: normalized text} of the par_id/hd_id elements of one page."""
    parser = _IdParagraphParser()
    parser.feed(markup)
    parser.close()
    return {
        element_id: cleaning.normalize_whitespace(text)
        for element_id, text in parser.texts.items()
    }


def _pages(package_root, language_folder):
    # Never through symlinks out of the package tree (`debian.tree_files`).
    language_root = pathlib.Path(package_root) / language_folder
    return sorted(
        path.relative_to(language_root).as_posix()
        for path in debian.tree_files(package_root, language_folder, "*.html")
    )


def paragraph_pairs(english_root, foreign_root, language):
    """Yields (english, foreign) paragraph pairs, by page then document order.

    Args:
        english_root: folder where libreoffice-help-en-us was unpacked.
        foreign_root: folder where libreoffice-help-<language> was unpacked.
        language: the help's language tag, e.g. "de".

    Pairs with an empty side, no letters, or the same text on both sides
    (untranslated) are left out.
    """
    english_help = pathlib.PurePosixPath(HELP_PATH) / ENGLISH_TAG
    foreign_help = pathlib.PurePosixPath(HELP_PATH) / language
    for page in _pages(english_root, english_help):
        english_page = pathlib.Path(english_root) / english_help / page
        foreign_page = debian.tree_path(foreign_root, foreign_help / page)
        if foreign_page is None or not foreign_page.is_file():
            continue
        english = page_paragraphs(english_page.read_text("utf-8", "replace"))
        foreign = page_paragraphs(foreign_page.read_text("utf-8", "replace"))
        for element_id, english_text in english.items():
            foreign_text = foreign.get(element_id, "")
            if (
                english_text
                and foreign_text
                and english_text != foreign_text
                and cleaning.has_letters(english_text)
            ):
                yield english_text, foreign_text
