"""Builds a built-in corpus and its tokenizer, and prints their statistics.

    python -m tf_moe.data.build --corpus=lm_en --data_dir=~/tensorflow_datasets

Fetches the Debian packages (apt-get download, cached in
`<data_dir>/downloads/debian/`), writes the tfds dataset to
`<data_dir>/<name>/<version>/`, trains the SentencePiece model on the train
split into `<data_dir>/<name>/<version>/vocab/`, and prints words per
source, examples and words per split, and timings. Re-running reuses all of
it.
"""

import json
import time

from absl import app
from absl import flags
import tensorflow_datasets as tfds

from tf_moe.data import builders
from tf_moe.data import tokenizer as tokenizer_lib

CORPORA = {
    "lm_en": builders.TfMoeLmEn.name,
    "lm_en_large": builders.TfMoeLmEnLarge.name,
    "translate_en_de": builders.TfMoeTranslateEnDe.name,
}

FLAGS = flags.FLAGS


def _define_flags():
    # Defined only when run as a script, so that a trainer can import
    # `build` next to its own --data_dir flag.
    flags.DEFINE_enum("corpus", "lm_en", sorted(CORPORA), "Corpus to build.")
    flags.DEFINE_string(
        "data_dir", None, "tfds data_dir (default: tfds's, ~/tensorflow_datasets)."
    )
    flags.DEFINE_string(
        "source_root",
        None,
        "Folder of already unpacked packages (<source_root>/<package>/usr/...); "
        "nothing is downloaded when set.",
    )
    flags.DEFINE_integer(
        "vocab_size", tokenizer_lib.DEFAULT_VOCAB_SIZE, "SentencePiece vocabulary size."
    )
    flags.DEFINE_bool("tokenizer", True, "Also train (or load) the tokenizer.")


def build(
    corpus,
    data_dir=None,
    source_root=None,
    vocab_size=tokenizer_lib.DEFAULT_VOCAB_SIZE,
    tokenizer=True,
):
    """Builds `corpus` and its tokenizer if missing; returns a report.

    Args:
        corpus: a key of CORPORA ("lm_en", "lm_en_large", "translate_en_de").
        data_dir: tfds data_dir (default: tfds's).
        source_root: folder of already unpacked packages (no download).
        vocab_size: SentencePiece vocabulary size.
        tokenizer: whether to train (or load) the tokenizer too.

    Returns:
        JSON-able dict: dataset, build_seconds, data_dir, splits (examples),
        statistics (words per source and split), debian_packages, and with
        `tokenizer` also tokenizer_seconds, vocab_size, vocab_path.

    Raises:
        ValueError: unknown `corpus`.
    """
    if corpus not in CORPORA:
        raise ValueError(
            f"corpus must be one of {sorted(CORPORA)}. Received: corpus={corpus!r}"
        )
    name = CORPORA[corpus]
    report = {"dataset": name}
    start = time.perf_counter()
    builder = tfds.builder(name, data_dir=data_dir, source_root=source_root)
    builder.download_and_prepare()
    report["build_seconds"] = round(time.perf_counter() - start, 1)
    report["data_dir"] = str(builder.data_dir)
    report["splits"] = {
        split: info.num_examples for split, info in builder.info.splits.items()
    }
    report["statistics"] = builder.info.metadata.get("statistics")
    report["debian_packages"] = builder.info.metadata.get("debian_packages")
    if tokenizer:
        start = time.perf_counter()
        model = tokenizer_lib.load_or_train(name, data_dir, vocab_size)
        report["tokenizer_seconds"] = round(time.perf_counter() - start, 1)
        report["vocab_size"] = model.vocab_size
        report["vocab_path"] = str(
            tokenizer_lib.vocab_path(builder, data_dir, vocab_size)
        )
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    report = build(
        FLAGS.corpus,
        data_dir=FLAGS.data_dir,
        source_root=FLAGS.source_root,
        vocab_size=FLAGS.vocab_size,
        tokenizer=FLAGS.tokenizer,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
