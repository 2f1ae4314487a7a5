"""Tests for tf_moe.data: sources, dedup/splits, builders, tokenizer, pipelines.

Everything runs on a tiny fake layout of unpacked Debian packages written
here (gzip dictd file, Sphinx HTML, an R lazy-load database, a SWORD zText
module, LibreOffice help pages in two languages and a gettext .mo catalog),
so no network is used. tfds `lm1b` and `wmt14_translate/de-en` are tested
with `tfds.testing.mock_data`. The data code is pure TensorFlow/NumPy and
does not depend on the Keras backend, so this test runs once (see BUILD).
"""

import gzip
import hashlib
import os
import pathlib
import shutil
import struct
import subprocess
import tempfile
import unicodedata
import zlib

from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import tf_moe.data
from tf_moe.data import build as build_lib
from tf_moe.data import builders
from tf_moe.data import corpus
from tf_moe.data import debian
from tf_moe.data import pipeline
from tf_moe.data import tokenizer as tokenizer_lib
from tf_moe.data.sources import gcide
from tf_moe.data.sources import gettext_catalogs
from tf_moe.data.sources import janeausten
from tf_moe.data.sources import libreoffice_help
from tf_moe.data.sources import html_manuals
from tf_moe.data.sources import sword


# Registered under test-only names: the real builders' 1% validation and test
# fractions would leave a corpus this small with empty splits.
class SmallSplitsLmEn(builders.TfMoeLmEn):
    name = "tf_moe_lm_en_small_splits"
    VALIDATION_FRACTION = 0.2
    TEST_FRACTION = 0.2


class SmallSplitsLmEnLarge(builders.TfMoeLmEnLarge):
    name = "tf_moe_lm_en_large_small_splits"
    VALIDATION_FRACTION = 0.2
    TEST_FRACTION = 0.2


class SmallSplitsTranslateEnDe(builders.TfMoeTranslateEnDe):
    name = "tf_moe_translate_en_de_small_splits"
    VALIDATION_FRACTION = 0.2
    TEST_FRACTION = 0.2


# ---------------------------------------------------------------- fake layout
# A sentence planted in three English sources (GCIDE sense, kernel doc
# paragraph, an Austen paragraph): dedup must keep exactly one copy.
PLANTED = "The planted sentence appears in several different sources."
# A whole paragraph planted in both Sphinx manuals.
PLANTED_PARAGRAPH = (
    "This identical paragraph is copied into both manuals to test exact "
    "deduplication."
)
ENGLISH_FILLERS = [
    f"Filler paragraph number {i} talks about kernels, pythons and novels "
    f"at some length, with words like {'alpha beta gamma delta'.split()[i % 4]}."
    for i in range(40)
]

GCIDE_DICT = """\
00-database-info
   This is a fake header block with enough words to be kept.

Kilkenny cats \\Kil*ken"ny cats\\, n. pl. [From {Kilkenny},
   Ireland.]
   Two cats fabled to have fought till only their {tails} were
   left. --Old Story.
   [1913 Webster]

   2. A mutual fight ending in the ruin of both. [Obs.]
      [1913 Webster]

   {Syn:} The planted sentence appears in several different sources.
      [1913 Webster]

Zyx \\Zyx\\, n.
   Short one.
   [1913 Webster]
"""
GCIDE_EXPECTED = [
    "This is a fake header block with enough words to be kept.",
    "Two cats fabled to have fought till only their tails were left.",
    "A mutual fight ending in the ruin of both.",
    PLANTED,
]

LINUX_PAGE = f"""<html><head><title>t</title><script>var x = "not text";</script>
</head><body><div class="body">
<p>Kernel text first sentence here is long enough. {PLANTED}</p>
<p>Too short to keep.</p>
<pre>code block that is not prose at all and is long enough</pre>
<p>A paragraph with <code>inline code</code> and <a href="#">a link</a> in
   its   middle, spread over lines.</p>
<p>{PLANTED_PARAGRAPH}</p>
{''.join(f'<p>{text}</p>' for text in ENGLISH_FILLERS[:20])}
</div></body></html>"""
LINUX_EXPECTED = [
    f"Kernel text first sentence here is long enough. {PLANTED}",
    "A paragraph with inline code and a link in its middle, spread over lines.",
    PLANTED_PARAGRAPH,
] + ENGLISH_FILLERS[:20]

PYTHON_PAGE = f"""<html><body>
<p>{PLANTED_PARAGRAPH}</p>
<p>The Python tutorial explains &amp; shows how lists and dicts work.</p>
{''.join(f'<p>{text}</p>' for text in ENGLISH_FILLERS[20:])}
</body></html>"""


def _manual_page(manual):
    """A page of one of `html_manuals.MORE_MANUALS`: its own texts, one
    paragraph of the built-in corpus (dropped by dedup) and a code block."""
    own = [
        f"The {manual.name} manual has its own paragraph number {i} with enough words."
        for i in range(3)
    ]
    markup = "<html><body>" + "".join(f"<p>{text}</p>" for text in own)
    markup += f"<pre>fn main() {{ println!(\"code is not prose at all\"); }}</pre>"
    markup += f"<p>{PLANTED_PARAGRAPH}</p><p>Short one.</p></body></html>"
    return markup, own


MANUAL_PAGES = {manual.name: _manual_page(manual) for manual in html_manuals.MORE_MANUALS}

AUSTEN_NOVELS = [
    [
        "EMMA",
        "",
        "CHAPTER I",
        "",
        "Emma Woodhouse, handsome, clever, and _rich_, with a comfortable",
        "home and happy disposition.",
        "",
        PLANTED,
        None,  # NA line: a paragraph break
        "It was a truth universally acknowledged.",
    ],
    ["PERSUASION", "", "Sir Walter Elliot, of Kellynch Hall,", "in Somersetshire."],
]
AUSTEN_EXPECTED = [
    "EMMA",
    "CHAPTER I",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and "
    "happy disposition.",
    PLANTED,
    "It was a truth universally acknowledged.",
    "PERSUASION",
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire.",
]

SWORD_VERSES = {
    "ot": [
        '<div type="book" osisID="Gen"/><title type="main">Genesis</title>'
        '<chapter osisID="Gen.1"/><div type="x-p" sID="p1"/>'
        '<w lemma="strong:H7225">In</w> <w>the</w> <w>beginning</w>, God '
        'created<note type="x-footnote">a footnote to drop</note> the heavens.',
        "The earth was formless and empty.",
        '<div type="x-p" sID="p2"/>God said, <q who="God">\u201cLet there be light,\u201d</q>'
        " and there was light.",
    ],
    "nt": [
        '<div type="book" osisID="Matt"/><chapter osisID="Matt.1"/>'
        "<w>The</w> book of the genealogy.",
        '<lg sID="lg1"/><l sID="l1"/>Blessed are the poor in spirit.',
    ],
}
SWORD_EXPECTED = [
    "In the beginning, God created the heavens. The earth was formless and empty.",
    "God said, \u201cLet there be light,\u201d and there was light.",
    "The book of the genealogy.",
    "Blessed are the poor in spirit.",
]

TRANSLATION_FILLERS = [
    (f"Filler sentence {i} about menus.", f"Fuellsatz {i} ueber Menues.")
    for i in range(40)
]


def _help_page(language, paragraphs):
    body = "".join(paragraphs)
    return (
        f'<!DOCTYPE html><html lang="{language}"><head><title>x</title></head>'
        f'<body><div id="DisplayArea">{body}</div></body></html>'
    )


HELP_EN = _help_page(
    "en-US",
    [
        '<h1 id="hd_id1" dir="auto">Saving Files</h1>',
        '<p id="par_id1" class="paragraph">Open the file. Then save it.</p>',
        '<p id="par_id3">LibreOffice</p>',  # untranslated: dropped
        '<p id="par_id4">One sentence only here.</p>',
        '<p id="par_id5">Click <span class="emph">Format - Cells</span>.<br/></p>',
        '<p id="par_id6">Only in English.</p>',  # no German: dropped
        '<table><tr><td><p id="par_id7">In a table cell.</p></td></tr></table>',
    ]
    + [
        f'<p id="par_idF{i}">{english}</p>'
        for i, (english, _) in enumerate(TRANSLATION_FILLERS)
    ],
)
HELP_DE = _help_page(
    "de",
    [
        '<p id="par_id5">Klicken Sie auf <span class="emph">Format - Zellen</span>.</p>',
        '<h1 id="hd_id1" dir="auto">Dateien speichern</h1>',
        '<p id="par_id1" class="paragraph">\u00d6ffnen Sie die Datei. '
        "Speichern Sie sie dann.</p>",
        '<p id="par_id3">LibreOffice</p>',
        '<p id="par_id4">Ein Satz. Zwei S\u00e4tze.</p>',
        '<p id="par_id8">Nur auf Deutsch.</p>',
        '<table><tr><td><p id="par_id7">In einer Tabellenzelle.</p></td></tr></table>',
    ]
    + [
        f'<p id="par_idF{i}">{german}</p>'
        for i, (_, german) in enumerate(TRANSLATION_FILLERS)
    ],
)
HELP_EXPECTED = [
    ("Saving Files", "Dateien speichern"),
    ("Open the file.", "\u00d6ffnen Sie die Datei."),
    ("Then save it.", "Speichern Sie sie dann."),
    ("One sentence only here.", "Ein Satz. Zwei S\u00e4tze."),
    ("Click Format - Cells.", "Klicken Sie auf Format - Zellen."),
    ("In a table cell.", "In einer Tabellenzelle."),
] + TRANSLATION_FILLERS

MO_MESSAGES = {
    "": "Content-Type: text/plain; charset=UTF-8\n"
    "Plural-Forms: nplurals=2; plural=n != 1;\n",
    "RID_OPEN\x04~Open": "\u00d6~ffnen",
    "RID_SAVE\x04Saving Files": "Dateien sichern",  # English already in help
    "%1 file\x00%1 files": "%1 Datei\x00%1 Dateien",
    "_Options": "_Optionen",
    "PDF": "PDF",  # untranslated: dropped
    "FILE_NAME_ID": "FILE_NAME_ID",
    "Insert Table": "Tabelle einf\u00fcgen",
}
UI_EXPECTED = [
    ("%1 file", "%1 Datei"),
    ("Insert Table", "Tabelle einf\u00fcgen"),
    ("Open", "\u00d6ffnen"),
    ("Options", "Optionen"),
    ("Saving Files", "Dateien sichern"),
]


def _write_mo(path, messages):
    """GNU .mo writer (the stdlib only reads them): magic, N, two tables."""
    keys = sorted(messages, key=lambda k: k.encode("utf-8"))
    ids = [k.encode("utf-8") for k in keys]
    strs = [messages[k].encode("utf-8") for k in keys]
    count = len(keys)
    ids_table, strs_table = 28, 28 + 8 * count
    data_start = 28 + 16 * count
    blob, id_entries, str_entries = b"", [], []
    for entries, items in ((id_entries, ids), (str_entries, strs)):
        for item in items:
            entries.append((len(item), data_start + len(blob)))
            blob += item + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, count, ids_table, strs_table, 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in id_entries + str_entries)
    path.write_bytes(header + tables + blob)


def _xdr_character_vector(strings):
    """R serialization version 3 (XDR) of a character vector."""
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500)
    out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(strings))
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            data = s.encode("utf-8")
            out += struct.pack(">ii", 0x00040009, len(data)) + data
    return out


def _xdr_integer_vector(values):
    out = b"X\n" + struct.pack(">iii", 3, 0x040201, 0x030500)
    out += struct.pack(">i", 5) + b"UTF-8"
    return out + struct.pack(">ii", 13, len(values)) + struct.pack(f">{len(values)}i", *values)


def _write_rdb(path, payloads):
    with open(path, "wb") as f:
        for payload in payloads:
            f.write(struct.pack(">I", len(payload)) + zlib.compress(payload))


def _write_ztext(folder, testament, verses):
    """One zlib block holding every verse; slot 0 is an empty header slot."""
    block = b""
    verse_entries = [struct.pack("<IIH", 0, 0, 0)]
    for verse in verses:
        data = verse.encode("utf-8")
        verse_entries.append(struct.pack("<IIH", 0, len(block), len(data)))
        block += data
    compressed = zlib.compress(block)
    (folder / f"{testament}.bzz").write_bytes(compressed)
    (folder / f"{testament}.bzs").write_bytes(
        struct.pack("<III", 0, len(compressed), len(block))
    )
    (folder / f"{testament}.bzv").write_bytes(b"".join(verse_entries))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def make_fake_packages(root):
    """Writes every corpus package's files, unpacked, under `root`."""
    root = pathlib.Path(root)
    dict_path = root / "dict-gcide" / gcide.DICT_PATH
    dict_path.parent.mkdir(parents=True)
    with gzip.open(dict_path, "wt", encoding="utf-8") as f:
        f.write(GCIDE_DICT)

    linux = root / "linux-doc-6.1" / html_manuals.LINUX_DOC.html_path
    _write(linux / "admin-guide" / "page.html", LINUX_PAGE)
    _write(linux / "_sources" / "skip.html", "<p>" + "sources copy " * 10 + "</p>")
    _write(linux / "translations" / "de.html", "<p>" + "deutscher text " * 10 + "</p>")
    python = root / "python3.11-doc" / html_manuals.PYTHON_DOC.html_path
    _write(python / "tutorial" / "index.html", PYTHON_PAGE)
    for manual in html_manuals.MORE_MANUALS:
        html = root / manual.package / manual.html_path
        _write(html / "guide" / "index.html", MANUAL_PAGES[manual.name][0])

    rdb = root / "r-cran-janeaustenr" / janeausten.RDB_PATH
    rdb.parent.mkdir(parents=True)
    _write_rdb(
        rdb,
        [_xdr_character_vector(AUSTEN_NOVELS[0]), _xdr_integer_vector([1, 2, 3]),
         _xdr_character_vector(AUSTEN_NOVELS[1])],
    )

    module = root / "sword-text-web" / sword.MODULE_PATH
    module.mkdir(parents=True)
    for testament, verses in SWORD_VERSES.items():
        _write_ztext(module, testament, verses)

    page = "text/shared/guide/saving.html"
    _write(root / "libreoffice-help-en-us" / libreoffice_help.HELP_PATH / "en-US" / page, HELP_EN)
    _write(root / "libreoffice-help-de" / libreoffice_help.HELP_PATH / "de" / page, HELP_DE)
    catalogs = root / "libreoffice-l10n-de" / gettext_catalogs.CATALOG_PATH.format(language="de")
    catalogs.mkdir(parents=True)
    _write_mo(catalogs / "fake.mo", MO_MESSAGES)
    return root


# ------------------------------------------------------------ references


def _reference_key(text):
    return " ".join(unicodedata.normalize("NFC", text).split()).casefold()


def _reference_split(text, validation_fraction, test_fraction):
    """The documented split rule: SHA-256 of the normalized, case-folded text."""
    digest = hashlib.sha256(_reference_key(text).encode("utf-8")).digest()
    unit = int.from_bytes(digest[:8], "big") / 2.0**64
    if unit < test_fraction:
        return "test"
    if unit < test_fraction + validation_fraction:
        return "validation"
    return "train"


def _texts(name, data_dir, split):
    dataset = tfds.load(name, split=split, data_dir=data_dir, download=False)
    return [
        {k: v.decode("utf-8") for k, v in example.items()}
        for example in tfds.as_numpy(dataset)
    ]


_FIXTURE = {}


def setUpModule():
    # Built once for every test class: the fake packages and both corpora.
    tmp = tempfile.mkdtemp()
    packages = make_fake_packages(pathlib.Path(tmp) / "packages")
    data_dir = str(pathlib.Path(tmp) / "tfds")
    for builder_class in (SmallSplitsLmEn, SmallSplitsLmEnLarge, SmallSplitsTranslateEnDe):
        builder_class(data_dir=data_dir, source_root=str(packages)).download_and_prepare()
    _FIXTURE.update(tmp=tmp, packages=packages, data_dir=data_dir)


def tearDownModule():
    shutil.rmtree(_FIXTURE["tmp"], ignore_errors=True)


class DataTestBase(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.tmp = _FIXTURE["tmp"]
        self.packages = _FIXTURE["packages"]
        self.data_dir = _FIXTURE["data_dir"]

    def lm_splits(self, name=SmallSplitsLmEn.name):
        return {
            split: [ex["text"] for ex in _texts(name, self.data_dir, split)]
            for split in corpus.SPLITS
        }

    def translation_splits(self):
        return {
            split: [
                (ex["en"], ex["de"])
                for ex in _texts(SmallSplitsTranslateEnDe.name, self.data_dir, split)
            ]
            for split in corpus.SPLITS
        }


class SourcesTest(DataTestBase):
    def test_gcide_strips_tags_citations_and_head_lines(self):
        self.assertEqual(list(gcide.paragraphs(self.packages / "dict-gcide")), GCIDE_EXPECTED)

    def test_sphinx_keeps_long_paragraphs_outside_pre_and_skipped_trees(self):
        paragraphs = list(html_manuals.LINUX_DOC.paragraphs(self.packages / "linux-doc-6.1"))
        self.assertEqual(paragraphs, LINUX_EXPECTED)

    def test_sphinx_decodes_character_references(self):
        paragraphs = list(html_manuals.PYTHON_DOC.paragraphs(self.packages / "python3.11-doc"))
        self.assertIn(
            "The Python tutorial explains & shows how lists and dicts work.", paragraphs
        )

    def test_r_database_reader_joins_wrapped_lines(self):
        paragraphs = list(janeausten.paragraphs(self.packages / "r-cran-janeaustenr"))
        self.assertEqual(paragraphs, AUSTEN_EXPECTED)

    def test_r_reader_rejects_non_character_vectors(self):
        with self.assertRaisesRegex(janeausten.RFormatError, "SEXP type 13"):
            janeausten.read_character_vector(_xdr_integer_vector([1]))

    def test_r_database_reader_detects_bad_length(self):
        payload = _xdr_character_vector(["a"])
        data = struct.pack(">I", len(payload) + 1) + zlib.compress(payload)
        with self.assertRaisesRegex(janeausten.RFormatError, "expected"):
            list(janeausten.iter_rdb_streams(data))

    def test_sword_reads_index_strips_osis_and_cuts_paragraphs(self):
        paragraphs = list(sword.paragraphs(self.packages / "sword-text-web"))
        self.assertEqual(paragraphs, SWORD_EXPECTED)

    def test_help_pairs_by_page_and_id(self):
        pairs = list(
            libreoffice_help.paragraph_pairs(
                self.packages / "libreoffice-help-en-us",
                self.packages / "libreoffice-help-de",
                "de",
            )
        )
        expected = [
            ("Saving Files", "Dateien speichern"),
            ("Open the file. Then save it.",
             "\u00d6ffnen Sie die Datei. Speichern Sie sie dann."),
            ("One sentence only here.", "Ein Satz. Zwei S\u00e4tze."),
            ("Click Format - Cells.", "Klicken Sie auf Format - Zellen."),
            ("In a table cell.", "In einer Tabellenzelle."),
        ] + TRANSLATION_FILLERS
        self.assertEqual(pairs, expected)

    def test_gettext_catalog_strips_contexts_and_accelerators(self):
        pairs = list(
            gettext_catalogs.ui_string_pairs(self.packages / "libreoffice-l10n-de", "de")
        )
        self.assertEqual(pairs, UI_EXPECTED)


class SplitRuleTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("plain", "Some text.", 0.1, 0.1),
        ("case_and_space", "  SOME   text. ", 0.1, 0.1),
        ("large_fractions", "Another text.", 0.4, 0.5),
    )
    def test_split_matches_reference_hash(self, text, validation, test):
        self.assertEqual(
            corpus.split_of(text, validation, test),
            _reference_split(text, validation, test),
        )

    def test_split_fractions_are_roughly_respected(self):
        counts = {split: 0 for split in corpus.SPLITS}
        for i in range(4000):
            counts[corpus.split_of(f"text number {i}", 0.1, 0.2)] += 1
        self.assertAlmostEqual(counts["validation"] / 4000, 0.1, delta=0.02)
        self.assertAlmostEqual(counts["test"] / 4000, 0.2, delta=0.02)

    @parameterized.named_parameters(
        ("negative", -0.1, 0.1, "validation_fraction"),
        ("too_large", 0.5, 0.5, "must be < 1"),
    )
    def test_bad_fractions_raise(self, validation, test, message):
        with self.assertRaisesRegex(ValueError, message):
            corpus.build_lm_splits((), {}, validation, test)


class LmBuilderTest(DataTestBase):
    def test_every_kept_text_is_in_the_split_its_hash_says(self):
        for split, texts in self.lm_splits().items():
            self.assertNotEmpty(texts, split)
            for text in texts:
                self.assertEqual(_reference_split(text, 0.2, 0.2), split, text)

    def test_no_text_in_two_splits_and_planted_duplicates_kept_once(self):
        splits = self.lm_splits()
        everything = [t for texts in splits.values() for t in texts]
        keys = [_reference_key(t) for t in everything]
        self.assertLen(set(keys), len(keys))
        # The planted sentence survives in exactly one example.
        self.assertLen([t for t in everything if PLANTED in t], 1)
        self.assertLen([t for t in everything if t == PLANTED_PARAGRAPH], 1)
        # The kernel paragraph lost its (already seen) planted sentence.
        self.assertIn("Kernel text first sentence here is long enough.", everything)

    def test_all_sources_contribute_and_statistics_add_up(self):
        everything = {t for texts in self.lm_splits().values() for t in texts}
        for text in (
            GCIDE_EXPECTED[1], LINUX_EXPECTED[1], AUSTEN_EXPECTED[2], SWORD_EXPECTED[1],
        ):
            self.assertIn(text, everything)
        builder = tfds.builder(SmallSplitsLmEn.name, data_dir=self.data_dir)
        stats = builder.info.metadata["statistics"]
        self.assertEqual(
            sum(s["kept_examples"] for s in stats["sources"].values()), len(everything)
        )
        for split in corpus.SPLITS:
            self.assertEqual(
                stats["splits"][split]["examples"], builder.info.splits[split].num_examples
            )
        self.assertEqual(
            stats["sources"]["gcide"]["read_words"],
            sum(len(t.split()) for t in GCIDE_EXPECTED),
        )

    def test_rebuild_is_deterministic(self):
        other = tempfile.mkdtemp(dir=self.tmp)
        SmallSplitsLmEn(data_dir=other, source_root=str(self.packages)).download_and_prepare()
        for split in corpus.SPLITS:
            self.assertEqual(
                sorted(ex["text"] for ex in _texts(SmallSplitsLmEn.name, other, split)),
                sorted(self.lm_splits()[split]),
            )

    def test_registered_name_loads_with_tfds_load(self):
        # The real builder keeps 1% for validation and 1% for test: give it
        # enough paragraphs for neither split to be empty.
        packages = pathlib.Path(self.tmp) / "packages_many"
        shutil.copytree(self.packages, packages)
        extra = [f"Extra paragraph {i} makes the corpus large enough to split." for i in range(800)]
        _write(
            packages / "python3.11-doc" / html_manuals.PYTHON_DOC.html_path / "extra.html",
            "".join(f"<p>{text}</p>" for text in extra),
        )
        data_dir = tempfile.mkdtemp(dir=self.tmp)
        report = build_lib.build(
            "lm_en", data_dir=data_dir, source_root=str(packages), vocab_size=400
        )
        self.assertEqual(sum(report["splits"].values()), len(extra) + sum(
            len(texts) for texts in self.lm_splits().values()))
        self.assertTrue(pathlib.Path(report["vocab_path"]).is_file())
        self.assertEqual(
            report["statistics"]["sources"]["gcide"]["kept_words"],
            sum(len(t.split()) for t in GCIDE_EXPECTED),
        )
        # Once built, loading needs only the registered name and the data_dir.
        dataset = tfds.load("tf_moe_lm_en", split="train+validation+test", data_dir=data_dir)
        texts = {ex["text"].decode("utf-8") for ex in tfds.as_numpy(dataset)}
        expected = {t for ts in self.lm_splits().values() for t in ts} | set(extra)
        self.assertEqual(texts, expected)

    def test_build_rejects_unknown_corpus(self):
        with self.assertRaisesRegex(ValueError, "lm_en"):
            build_lib.build("lm_fr", data_dir=self.tmp)

    def test_empty_split_gives_clear_error(self):
        with self.assertRaisesRegex(ValueError, "too small"):
            tf_moe.data.TfMoeLmEn(
                data_dir=tempfile.mkdtemp(dir=self.tmp), source_root=str(self.packages)
            ).download_and_prepare()

    def test_missing_package_names_the_folder(self):
        with self.assertRaisesRegex(FileNotFoundError, "dict-gcide"):
            builder = tf_moe.data.TfMoeLmEn(
                data_dir=tempfile.mkdtemp(dir=self.tmp),
                source_root=tempfile.mkdtemp(dir=self.tmp),
            )
            builder.download_and_prepare()


class LargeLmBuilderTest(DataTestBase):
    def test_every_lm_en_text_is_kept_in_the_same_split(self):
        small, large = self.lm_splits(), self.lm_splits(SmallSplitsLmEnLarge.name)
        for split in corpus.SPLITS:
            self.assertContainsSubset(small[split], large[split], split)

    def test_every_manual_adds_its_texts_and_nothing_already_seen(self):
        large = self.lm_splits(SmallSplitsLmEnLarge.name)
        everything = [t for texts in large.values() for t in texts]
        small = {t for texts in self.lm_splits().values() for t in texts}
        added = sorted(t for t in everything if t not in small)
        expected = sorted(t for _, own in MANUAL_PAGES.values() for t in own)
        self.assertEqual(added, expected)
        self.assertLen([t for t in everything if t == PLANTED_PARAGRAPH], 1)
        for split, texts in large.items():
            for text in texts:
                self.assertEqual(_reference_split(text, 0.2, 0.2), split, text)
        stats = tfds.builder(SmallSplitsLmEnLarge.name, data_dir=self.data_dir).info.metadata
        for manual in html_manuals.MORE_MANUALS:
            self.assertEqual(stats["statistics"]["sources"][manual.name]["kept_examples"], 3)
            self.assertEqual(stats["licences"][manual.name], manual.licence)
            self.assertIn(manual.package, stats["debian_packages"])

    def test_build_knows_the_large_corpus(self):
        self.assertEqual(build_lib.CORPORA["lm_en_large"], "tf_moe_lm_en_large")
        with self.assertRaisesRegex(ValueError, "lm_en_large"):
            build_lib.build("lm_xl", data_dir=self.tmp)


class TranslationBuilderTest(DataTestBase):
    def test_pairs_are_split_deduplicated_and_hashed_on_english(self):
        splits = self.translation_splits()
        everything = [pair for pairs in splits.values() for pair in pairs]
        expected = HELP_EXPECTED + [
            pair for pair in UI_EXPECTED if pair[0] != "Saving Files"
        ]
        self.assertCountEqual(everything, expected)
        for split, pairs in splits.items():
            self.assertNotEmpty(pairs, split)
            for english, _ in pairs:
                self.assertEqual(_reference_split(english, 0.2, 0.2), split)

    def test_features_match_wmt14(self):
        builder = tfds.builder(SmallSplitsTranslateEnDe.name, data_dir=self.data_dir)
        self.assertIsInstance(builder.info.features, tfds.features.Translation)
        self.assertEqual(tuple(builder.info.features.languages), ("de", "en"))


class TokenizerTest(DataTestBase):
    VOCAB = 400

    def tokenizer(self):
        return tokenizer_lib.load_or_train(
            SmallSplitsLmEn.name, self.data_dir, vocab_size=self.VOCAB
        )

    def test_round_trip_on_train_text(self):
        tokenizer = self.tokenizer()
        texts = self.lm_splits()["train"][:20]
        ids = tokenizer.tokenize(tf.constant(texts))
        self.assertEqual(ids.dtype, tf.int32)
        decoded = [t.decode("utf-8") for t in tokenizer.detokenize(ids).numpy()]
        self.assertEqual(decoded, texts)
        flat = ids.flat_values.numpy()
        self.assertTrue(np.all((flat > tokenizer_lib.EOS_ID) & (flat < tokenizer.vocab_size)))
        # Byte fallback: a character never seen in training survives too.
        unseen = "Gr\u00fc\u00dfe \u2603 \u4e16\u754c"
        ids = tokenizer.tokenize(tf.constant([unseen]))
        self.assertNotIn(tokenizer_lib.UNK_ID, ids.flat_values.numpy())
        self.assertEqual(tokenizer.detokenize(ids).numpy()[0].decode("utf-8"), unseen)

    def test_dense_detokenize_stops_at_eos_and_drops_padding(self):
        tokenizer = self.tokenizer()
        ids = tokenizer.tokenize(tf.constant(["Filler paragraph number"])).to_list()[0]
        row = [tokenizer_lib.BOS_ID] + ids + [tokenizer_lib.EOS_ID] + ids + [0, 0]
        self.assertEqual(
            tokenizer.detokenize(tf.constant([row])).numpy()[0], b"Filler paragraph number"
        )

    def test_trained_on_train_only_cached_and_deterministic(self):
        tokenizer = self.tokenizer()
        path = (
            pathlib.Path(self.data_dir) / SmallSplitsLmEn.name / "1.0.0" / "vocab"
            / f"spm_unigram_{self.VOCAB}.model"
        )
        self.assertEqual(path.read_bytes(), tokenizer.model)
        # The cached model is byte for byte the one trained on the train
        # split alone, and adding the held-out text would change it.
        splits = self.lm_splits()
        # Retraining from scratch gives the same bytes.
        retrained = tokenizer_lib.train_model(splits["train"], self.VOCAB)
        self.assertEqual(retrained, tokenizer.model)
        with_held_out = tokenizer_lib.train_model(
            splits["train"] + splits["validation"] + splits["test"], self.VOCAB
        )
        self.assertNotEqual(with_held_out, tokenizer.model)


class PipelineTest(DataTestBase):
    def test_lm_windows_are_the_shifted_token_stream(self):
        tokenizer = tokenizer_lib.load_or_train(SmallSplitsLmEn.name, self.data_dir, 400)
        seq_len, batch = 16, 3
        dataset = pipeline.lm_dataset(
            SmallSplitsLmEn.name, "train", seq_len, batch, self.data_dir,
            vocab_size=400, shuffle=False,
        )
        inputs, targets = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
        self.assertEqual(inputs[0].shape, (batch, seq_len))
        self.assertEqual(inputs[0].dtype, np.int32)
        # Reference stream: each document's ids then EOS, in file order.
        texts = [ex["text"] for ex in _texts(SmallSplitsLmEn.name, self.data_dir, "train")]
        stream = []
        for ids in tokenizer.tokenize(tf.constant(texts)).to_list():
            stream += ids + [tokenizer_lib.EOS_ID]
        windows = np.concatenate([np.concatenate([x, y[:, -1:]], axis=1) for x, y in zip(inputs, targets)])
        expected = np.array(stream[: len(windows) * (seq_len + 1)]).reshape(-1, seq_len + 1)
        np.testing.assert_array_equal(windows, expected)
        np.testing.assert_array_equal(
            np.concatenate(inputs)[:, 1:], np.concatenate(targets)[:, :-1]
        )
        self.assertEqual(len(windows), (len(stream) // (seq_len + 1)) // batch * batch)

    def test_translation_batches_shift_target_and_pad(self):
        tokenizer = tokenizer_lib.load_or_train(
            SmallSplitsTranslateEnDe.name, self.data_dir, 400
        )
        max_length = 12
        dataset = pipeline.translation_dataset(
            SmallSplitsTranslateEnDe.name, "train", max_length, 4, self.data_dir,
            vocab_size=400, shuffle=False, drop_remainder=False,
        )
        pairs = [(ex["en"], ex["de"]) for ex in _texts(SmallSplitsTranslateEnDe.name, self.data_dir, "train")]
        features, target_out = next(iter(dataset))
        for row, (english, german) in enumerate(pairs[:4]):
            source_ids = tokenizer.tokenize(tf.constant([english])).to_list()[0]
            target_ids = tokenizer.tokenize(tf.constant([german])).to_list()[0]
            expected_source = (source_ids + [tokenizer_lib.EOS_ID])[:max_length]
            expected_in = ([tokenizer_lib.BOS_ID] + target_ids)[:max_length]
            expected_out = (target_ids + [tokenizer_lib.EOS_ID])[:max_length]
            pad = lambda ids: ids + [0] * (max_length - len(ids))
            np.testing.assert_array_equal(features["source"][row], pad(expected_source))
            np.testing.assert_array_equal(features["target_in"][row], pad(expected_in))
            np.testing.assert_array_equal(target_out[row], pad(expected_out))

    def test_unprepared_dataset_gives_clear_error(self):
        with self.assertRaisesRegex(FileNotFoundError, "tf_moe.data.build"):
            pipeline.lm_dataset(
                "tf_moe_lm_en", "train", 8, 2, tempfile.mkdtemp(dir=self.tmp),
                tokenizer=tokenizer_lib.load_or_train(SmallSplitsLmEn.name, self.data_dir, 400),
            )

    @parameterized.named_parameters(
        ("seq_len", {"seq_len": 0}, "seq_len"),
        ("batch_size", {"batch_size": 0}, "batch_size"),
    )
    def test_bad_arguments_raise(self, overrides, message):
        kwargs = {"seq_len": 8, "batch_size": 2, **overrides}
        with self.assertRaisesRegex(ValueError, message):
            pipeline.lm_dataset(SmallSplitsLmEn.name, "train", data_dir=self.data_dir, **kwargs)


# Stand-ins for apt-cache, apt-get and dpkg-deb: they log their arguments,
# and apt-get fails `download` until `update` ran when
# FAKE_APT_FAIL_UNTIL_UPDATE is set. apt-cache offers version 1.0-1 with the
# SHA-256 of what the fake `apt-get download` writes.
_FAKE_APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$FAKE_APT_LOG"
case "$1" in
  update) touch "$FAKE_APT_STATE/updated" ;;
  download)
    if [ -n "$FAKE_APT_FAIL_UNTIL_UPDATE" ] && [ ! -e "$FAKE_APT_STATE/updated" ]; then
      echo "E: Unable to locate package $2" >&2; exit 100
    fi
    echo deb > "$2_1.0-1_all.deb" ;;
esac
"""
_FAKE_DEB_SHA256 = hashlib.sha256(b"deb\n").hexdigest()  # what `echo deb` writes
_FAKE_APT_CACHE = f"""#!/bin/sh
echo "apt-cache $*" >> "$FAKE_APT_LOG"
for name; do :; done
cat <<STANZA
Package: $name
Version: 1.0-1
Architecture: all
Filename: pool/main/f/$name/${{name}}_1.0-1_all.deb
SHA256: {_FAKE_DEB_SHA256}
STANZA
"""
_FAKE_DPKG_DEB = """#!/bin/sh
echo "dpkg-deb $*" >> "$FAKE_APT_LOG"
mkdir -p "$3/usr/share/fake" && basename "$2" > "$3/usr/share/fake/from"
"""


class DebianPackagesTest(parameterized.TestCase):
    """Fetching and caching, with fake apt-cache/apt-get/dpkg-deb on PATH."""

    def setUp(self):
        super().setUp()
        self.tmp = pathlib.Path(self.create_tempdir().full_path)
        bin_dir = self.tmp / "bin"
        bin_dir.mkdir()
        for name, script in (
            ("apt-cache", _FAKE_APT_CACHE),
            ("apt-get", _FAKE_APT_GET),
            ("dpkg-deb", _FAKE_DPKG_DEB),
        ):
            (bin_dir / name).write_text(script)
            (bin_dir / name).chmod(0o755)
        self.log = self.tmp / "log"
        self.log.touch()
        self.env = {
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_APT_LOG": str(self.log),
            "FAKE_APT_STATE": str(self.tmp),
        }

    def commands(self):
        return self.log.read_text().splitlines()

    def test_downloads_unpacks_once_then_reuses_cache(self):
        cache = self.tmp / "cache"
        with mock.patch.dict(os.environ, self.env):
            root = debian.PackageRoots(cache).root("dict-gcide")
            again = debian.PackageRoots(cache).root("dict-gcide")
        self.assertEqual(root, again)
        self.assertEqual(root, cache / "unpacked" / "dict-gcide")
        self.assertEqual((root / "usr/share/fake/from").read_text().strip(), "dict-gcide_1.0-1_all.deb")
        self.assertEqual(debian.PackageRoots(cache).deb_file("dict-gcide"), "dict-gcide_1.0-1_all.deb")
        # Checked and unpacked once; the second call trusts the marker.
        self.assertLen(self.commands(), 3)
        self.assertEqual(self.commands()[0], "apt-cache show --no-all-versions dict-gcide")
        self.assertEqual(self.commands()[1], "apt-get download dict-gcide")
        self.assertTrue(self.commands()[2].startswith("dpkg-deb -x "))

    def test_runs_apt_get_update_once_when_download_fails(self):
        env = {**self.env, "FAKE_APT_FAIL_UNTIL_UPDATE": "1"}
        with mock.patch.dict(os.environ, env):
            debian.PackageRoots(self.tmp / "cache").roots(["dict-gcide", "sword-text-web"])
        self.assertEqual(
            [c for c in self.commands() if c.startswith("apt-get")],
            ["apt-get download dict-gcide", "apt-get update",
             "apt-get download dict-gcide", "apt-get download sword-text-web"],
        )

    def test_failing_download_without_update_names_the_remedy(self):
        env = {**self.env, "FAKE_APT_FAIL_UNTIL_UPDATE": "1"}
        with mock.patch.dict(os.environ, env):
            with self.assertRaisesRegex(debian.PackageError, "apt-get update"):
                debian.PackageRoots(self.tmp / "cache", update_lists=False).root("dict-gcide")
        self.assertEqual(
            self.commands(),
            ["apt-cache show --no-all-versions dict-gcide", "apt-get download dict-gcide"],
        )


def _build_deb(folder, name, version, text):
    """A real .deb (dpkg-deb --build) holding usr/share/doc/<name>/text.txt."""
    tree = pathlib.Path(tempfile.mkdtemp(dir=folder))
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <test@example.com>\nDescription: test package\n"
    )
    _write(tree / "usr" / "share" / "doc" / name / "text.txt", text)
    deb = pathlib.Path(folder) / f"{name}-{len(list(pathlib.Path(folder).iterdir()))}.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(tree), str(deb)],
        check=True, capture_output=True,
    )
    shutil.rmtree(tree)
    return deb


class _FakeArchive:
    """Stands in for apt-cache and apt-get as `debian._run`; dpkg-deb is real.

    `apt-cache show` offers `version` with the SHA-256 of `offered` (None: no
    SHA256 field); each `apt-get download` copies the next of `downloads`
    (the last one again when they run out) to the file name apt-get uses.
    """

    def __init__(self, name, version, offered, downloads=()):
        self.name, self.version = name, version
        self.sha256 = debian.sha256_of(offered) if offered else None
        self.downloads = list(downloads)
        self.calls = []
        self._run = debian._run  # pylint: disable=protected-access

    def __call__(self, command, cwd):
        if command[0] == "dpkg-deb":
            return self._run(command, cwd)
        self.calls.append(" ".join(command))
        if command[:2] == ["apt-cache", "show"]:
            # An installed-version stanza (no SHA256) first, as apt-cache
            # prints it, then the archive's.
            stanza = (
                f"Package: {self.name}\nVersion: 0.1-1\nStatus: install ok installed\n\n"
                f"Package: {self.name}\nVersion: {self.version}\nArchitecture: all\n"
                "Description: test package\n continued description line\n"
                f"Filename: pool/main/t/{self.name}_{self.version.split(':')[-1]}_all.deb\n"
            )
            if self.sha256:
                stanza += f"SHA256: {self.sha256}\n"
            return subprocess.CompletedProcess(command, 0, stdout=stanza, stderr="")
        if command[:2] == ["apt-get", "download"]:
            source = self.downloads.pop(0) if len(self.downloads) > 1 else self.downloads[0]
            version = self.version.replace(":", "%3a")
            shutil.copy(source, pathlib.Path(cwd) / f"{self.name}_{version}_all.deb")
            return subprocess.CompletedProcess(command, 0, stdout="", stderr="")
        if command == ["apt-get", "update"]:
            return subprocess.CompletedProcess(command, 0, stdout="", stderr="")
        raise AssertionError(f"unexpected command {command}")

    def downloaded(self):
        return [c for c in self.calls if c.startswith("apt-get download")]


@absltest.skipUnless(shutil.which("dpkg-deb"), "needs dpkg-deb to build test .deb files")
class PackageHashTest(parameterized.TestCase):
    """Every .deb is checked against apt-cache's SHA-256 before it is used."""

    NAME = "tf-moe-test-package"

    def setUp(self):
        super().setUp()
        self.tmp = pathlib.Path(self.create_tempdir().full_path)
        self.debs = self.tmp / "debs"
        self.debs.mkdir()
        self.cache = self.tmp / "cache"
        self.cache.mkdir()
        self.good = _build_deb(self.debs, self.NAME, "1.0-1", "The archive's own text.")
        self.evil = _build_deb(self.debs, self.NAME, "1.0-1", "Tampered text from a bad mirror.")

    def root(self, archive, **kwargs):
        with mock.patch.object(debian, "_run", archive):
            return debian.PackageRoots(self.cache, **kwargs).root(self.NAME)

    def text(self, root):
        return (root / "usr" / "share" / "doc" / self.NAME / "text.txt").read_text()

    def test_cached_deb_with_the_right_hash_is_used(self):
        cached = self.cache / f"{self.NAME}_1.0-1_all.deb"
        shutil.copy(self.good, cached)
        archive = _FakeArchive(self.NAME, "1.0-1", self.good, [self.evil])
        root = self.root(archive)
        self.assertEqual(self.text(root), "The archive's own text.")
        self.assertEmpty(archive.downloaded())
        self.assertTrue(cached.is_file())
        marker = (root / ".unpacked").read_text()
        self.assertIn(f"sha256:{debian.sha256_of(self.good)}", marker)
        self.assertEqual(debian.PackageRoots(self.cache).deb_file(self.NAME), cached.name)

    def test_cached_deb_with_a_wrong_hash_is_deleted_and_downloaded_again(self):
        cached = self.cache / f"{self.NAME}_1.0-1_all.deb"
        shutil.copy(self.evil, cached)
        archive = _FakeArchive(self.NAME, "1.0-1", self.good, [self.good])
        with self.assertLogs(level="WARNING") as logs:
            root = self.root(archive)
        self.assertEqual(self.text(root), "The archive's own text.")
        self.assertEqual(archive.downloaded(), [f"apt-get download {self.NAME}"])
        self.assertEqual(debian.sha256_of(cached), debian.sha256_of(self.good))
        self.assertIn(debian.sha256_of(self.evil), "\n".join(logs.output))

    def test_download_that_keeps_mismatching_raises_naming_both_digests(self):
        archive = _FakeArchive(self.NAME, "1.0-1", self.good, [self.evil])
        expected, actual = debian.sha256_of(self.good), debian.sha256_of(self.evil)
        with self.assertRaises(debian.PackageError) as raised:
            self.root(archive)
        message = str(raised.exception)
        for part in (self.NAME, f"{self.NAME}_1.0-1_all.deb", expected, actual):
            self.assertIn(part, message)
        self.assertLen(archive.downloaded(), 2)  # the download, then once more
        self.assertEmpty(list(self.cache.glob("*.deb")))  # never kept
        self.assertFalse((self.cache / "unpacked" / self.NAME).exists())

    def test_of_two_cached_versions_the_offered_one_is_used(self):
        # Epoch versions: apt-get writes ':' as %3a; the newer-looking stale
        # file sorts last and used to win.
        offered = self.cache / f"{self.NAME}_2%3a1.0-1_all.deb"
        stale = self.cache / f"{self.NAME}_2%3a9.9-1_all.deb"
        shutil.copy(self.good, offered)
        shutil.copy(self.evil, stale)
        archive = _FakeArchive(self.NAME, "2:1.0-1", self.good, [self.evil])
        root = self.root(archive)
        self.assertEqual(self.text(root), "The archive's own text.")
        self.assertEmpty(archive.downloaded())
        self.assertEqual(debian.PackageRoots(self.cache).deb_file(self.NAME), offered.name)

    def test_no_sha256_from_apt_cache_raises_after_one_update(self):
        archive = _FakeArchive(self.NAME, "1.0-1", None, [self.good])
        with self.assertRaisesRegex(debian.PackageError, "cannot be checked"):
            self.root(archive)
        self.assertEqual(
            archive.calls,
            [f"apt-cache show --no-all-versions {self.NAME}", "apt-get update",
             f"apt-cache show --no-all-versions {self.NAME}"],
        )
        self.assertEmpty(archive.downloaded())
        without_update = _FakeArchive(self.NAME, "1.0-1", None, [self.good])
        with self.assertRaisesRegex(debian.PackageError, f"{self.NAME}.*cannot be checked"):
            self.root(without_update, update_lists=False)
        self.assertEqual(without_update.calls, [f"apt-cache show --no-all-versions {self.NAME}"])

    def test_tree_unpacked_without_a_recorded_digest_is_unpacked_again(self):
        root = self.cache / "unpacked" / self.NAME
        _write(root / "usr" / "share" / "doc" / self.NAME / "text.txt", "Unchecked old text.")
        (root / ".unpacked").write_text(f"{self.NAME}_1.0-1_all.deb\n")
        archive = _FakeArchive(self.NAME, "1.0-1", self.good, [self.good])
        self.assertEqual(self.text(self.root(archive)), "The archive's own text.")
        self.assertLen(archive.downloaded(), 1)
        # Now recorded: reused with no command at all.
        again = _FakeArchive(self.NAME, "1.0-1", self.good, [self.good])
        self.assertEqual(self.text(self.root(again)), "The archive's own text.")
        self.assertEmpty(again.calls)

    def test_source_root_is_used_without_hash_checks(self):
        source_root = self.tmp / "unpacked"
        (source_root / self.NAME).mkdir(parents=True)
        archive = _FakeArchive(self.NAME, "1.0-1", None)
        self.assertEqual(self.root(archive, source_root=source_root), source_root / self.NAME)
        self.assertEmpty(archive.calls)

    def test_offer_matches_archive_and_apt_get_file_names(self):
        stanzas = debian.parse_stanzas(
            "Package: p\nVersion: 1:2.0-1\n\n"
            "Package: p\nVersion: 1:2.0-1\nArchitecture: amd64\n"
            "Description: x\n more\nFilename: pool/main/p/p_2.0-1_amd64.deb\n"
            "SHA256: " + "AB" * 32 + "\n"
        )
        offer = debian.offer_from_stanzas("p", stanzas)
        self.assertEqual(offer.sha256, "ab" * 32)
        self.assertEqual(offer.file_name(), "p_1%3a2.0-1_amd64.deb")
        for file_name in ("p_2.0-1_amd64.deb", "p_1%3a2.0-1_amd64.deb", "p_1%3A2.0-1_amd64.deb"):
            self.assertTrue(offer.matches(file_name), file_name)
        for file_name in ("p_1%3a2.0-2_amd64.deb", "p_2.0-1_i386.deb", "q_2.0-1_amd64.deb"):
            self.assertFalse(offer.matches(file_name), file_name)
        self.assertIsNone(debian.offer_from_stanzas("p", stanzas[:1]))
        self.assertIsNone(debian.offer_from_stanzas("q", stanzas))


SECRET = "This secret host sentence must never reach any corpus at all."
SECRET_GERMAN = "Dieser geheime Satz des Rechners darf nie in einen Korpus."
IN_TREE = "This paragraph is linked from inside the package tree and is kept."


class SymlinkTest(DataTestBase):
    """No reader follows a symlink out of an unpacked package tree."""

    def setUp(self):
        super().setUp()
        tmp = pathlib.Path(self.create_tempdir().full_path)
        # Host files: valid pages and catalogs, so only the link rule keeps
        # them out.
        self.host = tmp / "host"
        _write(self.host / "secret.html", f"<p>{SECRET}</p>")
        _write(self.host / "dir" / "page.html", f"<p>{SECRET}</p>")
        _write(self.host / "help_en.html", _help_page("en-US", [f'<p id="par_idS">{SECRET}</p>']))
        _write(
            self.host / "help_de.html",
            _help_page("de", [f'<p id="par_idS">{SECRET_GERMAN}</p>']),
        )
        _write_mo(self.host / "secret.mo", {"": "Content-Type: text/plain; charset=UTF-8\n",
                                            SECRET: SECRET_GERMAN})
        self.packages = tmp / "packages"
        shutil.copytree(_FIXTURE["packages"], self.packages, symlinks=True)

        linux = self.packages / "linux-doc-6.1"
        html = linux / html_manuals.LINUX_DOC.html_path
        (html / "leak.html").symlink_to(self.host / "secret.html")  # absolute
        (html / "relative_leak.html").symlink_to(
            os.path.relpath(self.host / "secret.html", html)  # ../../.. out
        )
        (html / "outside_dir").symlink_to(self.host / "dir", target_is_directory=True)
        (html / "admin-guide" / "sub").mkdir()
        (html / "admin-guide" / "sub" / "escape").symlink_to(
            os.path.relpath(self.host / "dir", html / "admin-guide" / "sub"),
            target_is_directory=True,
        )
        _write(linux / "usr" / "share" / "linked" / "own.html", f"<p>{IN_TREE}</p>")
        (html / "inside.html").symlink_to(
            os.path.relpath(linux / "usr/share/linked/own.html", html)  # in the tree
        )

        help_root = libreoffice_help.HELP_PATH
        english = self.packages / "libreoffice-help-en-us" / help_root / "en-US" / "text"
        german = self.packages / "libreoffice-help-de" / help_root / "de" / "text"
        (english / "leak.html").symlink_to(self.host / "help_en.html")
        _write(german / "leak.html", _help_page("de", ['<p id="par_idS">Eigener Text.</p>']))
        _write(english / "leak_de.html", _help_page("en-US", ['<p id="par_idS">Own text.</p>']))
        (german / "leak_de.html").symlink_to(self.host / "help_de.html")

        catalogs = self.packages / "libreoffice-l10n-de" / gettext_catalogs.CATALOG_PATH.format(
            language="de")
        (catalogs / "leak.mo").symlink_to(self.host / "secret.mo")

    def assertNoSecret(self, texts):
        joined = "\n".join(str(text) for text in texts)
        self.assertNotIn("secret host sentence", joined)
        self.assertNotIn("geheime Satz", joined)

    def test_sphinx_skips_links_out_of_the_tree_and_keeps_in_tree_links(self):
        with self.assertLogs(level="WARNING") as logs:
            paragraphs = list(html_manuals.LINUX_DOC.paragraphs(self.packages / "linux-doc-6.1"))
        self.assertNoSecret(paragraphs)
        self.assertEqual(paragraphs, LINUX_EXPECTED + [IN_TREE])
        output = "\n".join(logs.output)
        for link in ("leak.html", "relative_leak.html", "outside_dir", "escape"):
            self.assertIn(link, output)
        self.assertIn(str(self.host.resolve() / "secret.html"), output)

    def test_help_and_catalog_pairs_skip_links_out_of_the_tree(self):
        help_pairs = list(
            libreoffice_help.paragraph_pairs(
                self.packages / "libreoffice-help-en-us",
                self.packages / "libreoffice-help-de",
                "de",
            )
        )
        self.assertNoSecret(help_pairs)
        self.assertIn(("Click Format - Cells.", "Klicken Sie auf Format - Zellen."), help_pairs)
        ui_pairs = list(
            gettext_catalogs.ui_string_pairs(self.packages / "libreoffice-l10n-de", "de")
        )
        self.assertNoSecret(ui_pairs)
        self.assertEqual(ui_pairs, UI_EXPECTED)

    @parameterized.named_parameters(
        ("gcide", "dict-gcide", gcide.DICT_PATH, gcide.paragraphs),
        ("austen", "r-cran-janeaustenr", janeausten.RDB_PATH, janeausten.paragraphs),
        ("sword", "sword-text-web", sword.MODULE_PATH + "/nt.bzz", sword.paragraphs),
    )
    def test_fixed_file_linked_out_of_the_tree_is_not_read(self, package, relative, read):
        # The host copy is a valid file: only the link rule stops it.
        path = self.packages / package / relative
        host_copy = self.host / "copies" / path.name
        host_copy.parent.mkdir()
        shutil.move(path, host_copy)
        path.symlink_to(host_copy)
        with self.assertRaisesRegex(FileNotFoundError, "outside the package tree"):
            list(read(self.packages / package))

    def test_linked_folder_on_the_path_is_resolved_too(self):
        dictd = self.packages / "dict-gcide" / pathlib.Path(gcide.DICT_PATH).parent
        shutil.move(dictd, self.host / "dictd")
        dictd.symlink_to(self.host / "dictd", target_is_directory=True)
        with self.assertRaisesRegex(FileNotFoundError, "outside the package tree"):
            list(gcide.paragraphs(self.packages / "dict-gcide"))
        # Linked inside the tree instead, it is read.
        dictd.unlink()
        shutil.move(self.host / "dictd", dictd.parent / "real-dictd")
        dictd.symlink_to("real-dictd", target_is_directory=True)
        self.assertEqual(list(gcide.paragraphs(self.packages / "dict-gcide")), GCIDE_EXPECTED)

    def test_built_corpora_hold_no_host_text(self):
        data_dir = self.create_tempdir().full_path
        for builder_class in (SmallSplitsLmEn, SmallSplitsTranslateEnDe):
            builder_class(data_dir=data_dir, source_root=str(self.packages)).download_and_prepare()
        texts = [
            value
            for name in (SmallSplitsLmEn.name, SmallSplitsTranslateEnDe.name)
            for split in corpus.SPLITS
            for example in _texts(name, data_dir, split)
            for value in example.values()
        ]
        self.assertNoSecret(texts)
        self.assertIn(IN_TREE, texts)
        self.assertIn("Open the file.", texts)


class MockedTfdsDatasetsTest(parameterized.TestCase):
    """The pipelines accept tfds's own datasets (random data via mock_data)."""

    def test_lm1b(self):
        data_dir = self.create_tempdir().full_path
        with tfds.testing.mock_data(num_examples=40):
            dataset = pipeline.lm_dataset("lm1b", "train", 8, 2, data_dir, vocab_size=300)
            inputs, targets = next(iter(dataset))
        self.assertEqual(inputs.shape, (2, 8))
        np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])
        self.assertTrue(
            (pathlib.Path(data_dir) / "lm1b" / "1.1.0" / "vocab" / "spm_unigram_300.model").is_file()
        )

    def test_wmt14(self):
        data_dir = self.create_tempdir().full_path
        with tfds.testing.mock_data(num_examples=40):
            dataset = pipeline.translation_dataset(
                "wmt14_translate/de-en", "validation", 10, 4, data_dir, vocab_size=300
            )
            features, target_out = next(iter(dataset))
        self.assertEqual(features["source"].shape, (4, 10))
        self.assertEqual(target_out.shape, (4, 10))
        np.testing.assert_array_equal(features["target_in"][:, 0], [tokenizer_lib.BOS_ID] * 4)
        self.assertTrue(
            (pathlib.Path(data_dir) / "wmt14_translate" / "de-en" / "1.0.0" / "vocab").is_dir()
        )


if __name__ == "__main__":
    absltest.main()
