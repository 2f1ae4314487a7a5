"""tfds builders of the built-in corpora: `tf_moe_lm_en`, `tf_moe_lm_en_large`,
`tf_moe_translate_en_de`.

Owns: the tfds side (features, splits, version, metadata) of the corpora
that `sources` extract and `corpus` deduplicates and splits. Importing this
module registers the builders with tfds, so that
`tfds.load("tf_moe_lm_en", data_dir=...)` works.

Packages are fetched with `apt-get download` into
`<download_dir>/debian/` (by default `<data_dir>/downloads/debian/`), not
through tfds's download manager. Pass `source_root=` (a folder of unpacked
packages, `<source_root>/<package>/usr/...`) to build without the network:

    tfds.load("tf_moe_lm_en", data_dir=d, builder_kwargs={"source_root": r})
"""

import pathlib

import tensorflow_datasets as tfds

from tf_moe.data import corpus
from tf_moe.data import debian
from tf_moe.data import sources

_CITATION = "Built from Debian packages; see docs/data.md for each source's licence."


class _DebianCorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: fetch packages, build splits, record statistics."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    VALIDATION_FRACTION = 0.01
    TEST_FRACTION = 0.01

    def __init__(self, *, source_root=None, update_package_lists=True, **kwargs):
        """Creates the builder.

        Args:
            source_root: folder of already unpacked packages
                (`<source_root>/<package>/usr/...`); nothing is downloaded.
            update_package_lists: run `apt-get update` once when a download
                fails.
            **kwargs: `tfds.core.DatasetBuilder` arguments (data_dir, ...).
        """
        self._source_root = source_root
        self._update_package_lists = update_package_lists
        super().__init__(**kwargs)

    def _sources(self):
        raise NotImplementedError

    def _build_splits(self, roots):
        raise NotImplementedError

    def _split_generators(self, dl_manager):
        packages = debian.PackageRoots(
            cache_dir=pathlib.Path(dl_manager.download_dir) / "debian",
            source_root=self._source_root,
            update_lists=self._update_package_lists,
        )
        names = sources.packages_of(self._sources())
        splits, stats = self._build_splits(packages.roots(names))
        empty = [split for split, examples in splits.items() if not examples]
        if empty:
            raise ValueError(
                f"{self.name}: the corpus is too small for the split fractions "
                f"(validation {self.VALIDATION_FRACTION}, test "
                f"{self.TEST_FRACTION}): no examples in {empty}. Statistics: {stats}"
            )
        self.info.metadata.update(
            {
                "statistics": stats,
                "debian_packages": {name: packages.deb_file(name) for name in names},
                "licences": {s.name: s.licence for s in self._sources()},
            }
        )
        return {
            split: self._generate_examples(examples)
            for split, examples in splits.items()
        }


class TfMoeLmEn(_DebianCorpusBuilder):
    """English paragraphs for language modelling (about 9M words).

    GCIDE dictionary definitions, Linux kernel and Python documentation,
    Jane Austen's novels and the World English Bible, cleaned, deduplicated
    and split 98/1/1 by a hash of each paragraph.
    """

    name = "tf_moe_lm_en"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            supervised_keys=None,
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _sources(self):
        return sources.ENGLISH_SOURCES

    def _build_splits(self, roots):
        return corpus.build_lm_splits(
            self._sources(), roots, self.VALIDATION_FRACTION, self.TEST_FRACTION
        )

    def _generate_examples(self, texts):
        for index, text in enumerate(texts):
            yield index, {"text": text}


class TfMoeLmEnLarge(TfMoeLmEn):
    """`tf_moe_lm_en` plus twelve more HTML manuals (about 14M words).

    Rust's standard library and books, LilyPond, PostgreSQL, SQLAlchemy,
    SciPy, pandas, Git, Django, Node.js, Octave, GIMP and Sphinx manuals
    after the sources of `tf_moe_lm_en`, so every `tf_moe_lm_en` example is
    kept, in the same split; the same dedup and 98/1/1 hash split.
    """

    name = "tf_moe_lm_en_large"

    def _sources(self):
        return sources.LARGE_ENGLISH_SOURCES


class TfMoeTranslateEnDe(_DebianCorpusBuilder):
    """English-German pairs from LibreOffice's help and UI translations.

    Help paragraphs aligned by (page, element id) and cut into sentence pairs
    where both sides have as many sentences, plus the UI message catalogs;
    deduplicated on each side and split 96/2/2 by a hash of the English text.
    Features as in `wmt14_translate/de-en`.
    """

    name = "tf_moe_translate_en_de"
    VALIDATION_FRACTION = 0.02
    TEST_FRACTION = 0.02
    LANGUAGE = "de"

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.Translation(languages=(self.LANGUAGE, "en")),
            supervised_keys=("en", self.LANGUAGE),
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
        )

    def _sources(self):
        return sources.parallel_sources(self.LANGUAGE)

    def _build_splits(self, roots):
        return corpus.build_translation_splits(
            self._sources(), roots, self.VALIDATION_FRACTION, self.TEST_FRACTION
        )

    def _generate_examples(self, pairs):
        for index, (english, foreign) in enumerate(pairs):
            yield index, {"en": english, self.LANGUAGE: foreign}


# Every built-in corpus, by tfds name: the trainers build these on first use.
BUILT_IN = (TfMoeLmEn.name, TfMoeLmEnLarge.name, TfMoeTranslateEnDe.name)
