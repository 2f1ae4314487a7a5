"""English-German UI strings from libreoffice-l10n-<lang>'s gettext catalogs.

Owns: reading the compiled `.mo` catalogs with the standard library's
`gettext.GNUTranslations` (msgid is the English string, msgstr the
translation) and cleaning UI markup: `~` and `_` accelerator markers,
message contexts (`context\\x04msgid`), the catalog header.
"""

import gettext
import re

from tf_moe.data import cleaning
from tf_moe.data import debian

CATALOG_PATH = "usr/lib/libreoffice/program/resource/{language}/LC_MESSAGES"
_CONTEXT_SEPARATOR = "\x04"
# A GTK mnemonic: one underscore right before a letter, e.g. "_Open".
_MNEMONIC = re.compile(r"_(?=[^\W\d_])")


def package_for(language):
    """Debian package holding the UI translations for `language`."""
    return f"libreoffice-l10n-{language.lower()}"


def clean_ui_string(text):
    """Removes accelerator markers and normalizes whitespace."""
    text = text.replace("~", "")
    if text.count("_") == 1:
        text = _MNEMONIC.sub("", text)
    return cleaning.normalize_whitespace(text)


def catalog_pairs(catalog):
    """(english, foreign) pairs of one `gettext.GNUTranslations`, sorted.

    Plural entries contribute their singular form; the header (empty msgid),
    untranslated entries and entries without letters are left out.
    """
    pairs = set()
    for key, translation in catalog._catalog.items():  # pylint: disable=protected-access
        if isinstance(key, tuple):  # plural: (msgid, index)
            msgid, index = key
            if index != 0:
                continue
        else:
            msgid = key
        msgid = msgid.rsplit(_CONTEXT_SEPARATOR, 1)[-1]
        english, foreign = clean_ui_string(msgid), clean_ui_string(translation)
        if english and foreign and english != foreign and cleaning.has_letters(english):
            pairs.add((english, foreign))
    return sorted(pairs)


def ui_string_pairs(package_root, language):
    """Yields (english, foreign) pairs of every catalog, by catalog name.

    Args:
        package_root: folder where libreoffice-l10n-<language> was unpacked.
        language: e.g. "de".
    """
    folder = CATALOG_PATH.format(language=language)
    for path in debian.tree_files(package_root, folder, "*.mo", recursive=False):
        with open(path, "rb") as f:
            catalog = gettext.GNUTranslations(f)
        yield from catalog_pairs(catalog)
