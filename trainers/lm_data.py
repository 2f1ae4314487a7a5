"""Language-modelling input of the trainers, from one of two sources.

`data.source`:
    "tfds"         `tf.data` pipelines over a tfds corpus, tokenized on the
                   fly (`tf_moe.data.pipeline`); needs TensorFlow.
    "token_cache"  a token cache exported once (`tf_moe.data.token_cache`),
                   read with Grain; needs no TensorFlow, so the trainers run
                   on JAX hosts without it (GPUs, TPU VMs).

Both give the contract of `trainers.loop.fit`: `make_train(start_step)` is
an infinite, deterministic batch stream positioned at batch `start_step`
(for exact resume), and the evaluation splits are finite. TensorFlow and
tfds are imported only on the "tfds" path.
"""

import dataclasses
import itertools
from typing import Any, Callable

import numpy as np

from trainers import loop

SOURCES = ("tfds", "token_cache")


@dataclasses.dataclass(frozen=True)
class LmData:
    """The LM input of one run.

    Attributes:
        vocab_size: V of the tokenizer.
        make_train: fn(start_step) -> infinite batches of (inputs, targets)
            <int32>[B, L], positioned at batch `start_step`.
        validation, test: finite evaluation batches (a `tf.data.Dataset` or
            a list of NumPy pairs; `loop.evaluate` takes both).
        train_target_counts: fn() -> <int64>[V] counts of the train split's
            targets (for the unigram baseline).
        tokenizer: the `tokenizer.Tokenizer` ("tfds") or `LmCache`
            ("token_cache"), for detokenizing samples.
    """

    vocab_size: int
    make_train: Callable[[int], Any]
    validation: Any
    test: Any
    train_target_counts: Callable[[], np.ndarray]
    tokenizer: Any


def check_source(data):
    """Raises ValueError naming the `data.source` / `data.token_cache_dir`
    field that is invalid."""
    source = data.get("source", "tfds")
    if source not in SOURCES:
        raise ValueError(
            f"`data.source` must be one of {SOURCES}. Received: data.source={source!r}"
        )
    cache_dir = data.get("token_cache_dir")
    if source == "token_cache" and not (isinstance(cache_dir, str) and cache_dir.strip()):
        raise ValueError(
            "`data.token_cache_dir` must name a token cache folder when "
            "data.source='token_cache' (export one with `python -m "
            "tf_moe.data.token_cache --corpus=... --out=...`). Received: "
            f"data.token_cache_dir={cache_dir!r}"
        )


def make(config, corpus, build_data):
    """`LmData` of `config.data` (the source it names) for `corpus`.

    Args:
        config: the run's ConfigDict (uses `data`, `train.batch_size`, `seed`).
        corpus: tfds name of the corpus ("tfds" source; a token cache must
            have been exported from it).
        build_data: build the built-in corpus first if missing ("tfds").
    """
    check_source(config.data)
    if config.data.get("source", "tfds") == "token_cache":
        return _from_token_cache(config, corpus)
    return _from_tfds(config, corpus, build_data)


def _evaluation_batches(batches, eval_batches):
    """The first `eval_batches` of `batches` (0: all) as a list."""
    return list(itertools.islice(batches, eval_batches or None))


def _from_token_cache(config, corpus):
    # pylint: disable-next=g-import-not-at-top
    from tf_moe.data import token_cache

    d = config.data
    try:
        cache = token_cache.load_lm_cache(d.token_cache_dir)
    except FileNotFoundError as error:
        raise loop.ConfigError(f"`data.token_cache_dir`: {error}") from error
    if cache.corpus != corpus:
        raise loop.ConfigError(
            f"The token cache in `data.token_cache_dir` was exported from corpus "
            f"{cache.corpus!r}, but `data.corpus` is {corpus!r}. Received: "
            f"data.token_cache_dir={d.token_cache_dir!r}, data.corpus={corpus!r}"
        )
    if cache.vocab_size != d.vocab_size:
        raise loop.ConfigError(
            f"The token cache's vocabulary has {cache.vocab_size} tokens, but "
            f"`data.vocab_size` is {d.vocab_size}; set data.vocab_size="
            f"{cache.vocab_size} or export a cache with --vocab_size="
            f"{d.vocab_size}. Received: data.token_cache_dir={d.token_cache_dir!r}"
        )
    for split in ("train", "validation", "test"):
        if split not in cache.splits:
            raise loop.ConfigError(
                f"The token cache in `data.token_cache_dir` has no {split!r} split "
                f"(it has {cache.splits}). Received: "
                f"data.token_cache_dir={d.token_cache_dir!r}"
            )
    length, batch = d.sequence_length, config.train.batch_size
    for split in ("train", "validation", "test"):
        field, size = "train.batch_size", batch
        if split != "train" and d.get("eval_batch_size") is not None:
            field, size = "data.eval_batch_size", d.eval_batch_size
        windows = len(cache.tokens(split)) // (length + 1)
        if windows < size:
            raise loop.ConfigError(
                f"`data.sequence_length` and `{field}` are too long for the token "
                f"cache: split {split!r} holds {windows} windows of sequence_length "
                f"+ 1 tokens, fewer than one batch. Received: "
                f"data.sequence_length={length}, {field}={size}"
            )

    def loader(split, batch_size=batch, **kwargs):
        return token_cache.lm_loader(cache, split, length, batch_size, **kwargs)

    def evaluation(split):
        batches = loader(split, batch_size=loop.eval_batch_size(config), shuffle=False)
        return _evaluation_batches(batches, d.eval_batches)

    def make_train(start_step):
        # The stream is a fixed function of (seed, step): skipping `start_step`
        # batches is random access into Grain's MapDataset, so resuming costs
        # nothing and yields the batches of the uninterrupted run.
        batches = loader("train", shuffle=True, seed=config.seed, repeat=True, start=start_step)
        return (batch for batch in batches)  # Keras's fit takes a generator

    def train_target_counts():
        # Targets of every train window: tokens 1..L of each L + 1 window.
        tokens = cache.tokens("train")
        windows = len(tokens) // (length + 1)
        targets = np.asarray(tokens[: windows * (length + 1)]).reshape(windows, length + 1)[:, 1:]
        return np.bincount(targets.ravel(), minlength=cache.vocab_size)

    return LmData(
        vocab_size=cache.vocab_size,
        make_train=make_train,
        validation=evaluation("validation"),
        test=evaluation("test"),
        train_target_counts=train_target_counts,
        tokenizer=cache,
    )


def prepare_tfds_corpus(data, corpus, build_data, translation=False):
    """Builds the built-in `corpus` if `build_data` (once; a no-op
    afterwards), checks that it is prepared in `data.data_dir` and is a text
    (or, with `translation`, a translation) dataset, and returns its
    tokenizer of `data.vocab_size` (trained on first use)."""
    # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds
    from tf_moe import data as data_lib
    from tf_moe.data import tokenizer as tokenizer_lib

    builder = loop.corpus_builder(corpus, data.data_dir)
    built_in = data_lib.builders.BUILT_IN
    if build_data and corpus in built_in:
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise loop.ConfigError(
            f"`data.corpus` {corpus!r} is not prepared in `data.data_dir` "
            f"({builder.data_dir}): prepare it there with tfds (`tfds build "
            f"{corpus} --data_dir=...`) or point data.data_dir at it. Received: "
            f"data.data_dir={data.data_dir!r}"
        )
    if isinstance(builder.info.features, tfds.features.Translation) != translation:
        kind, needed = ("a text (language-modelling)", "a translation") if translation else (
            "a translation", "a text (language-modelling)")
        raise loop.ConfigError(
            f"`data.corpus` is {kind} dataset; this task needs {needed} dataset. "
            f"Received: data.corpus={corpus!r}"
        )
    return tokenizer_lib.load_or_train(corpus, data.data_dir, data.vocab_size)


def _from_tfds(config, corpus, build_data):
    from tf_moe.data import pipeline  # pylint: disable=g-import-not-at-top

    d = config.data
    tokenizer = prepare_tfds_corpus(d, corpus, build_data)

    def split(name, batch_size=config.train.batch_size, **kwargs):
        return pipeline.lm_dataset(
            corpus, name, d.sequence_length, batch_size, d.data_dir,
            tokenizer=tokenizer, seed=config.seed, **kwargs,
        )

    def make_train(start_step):
        return split("train", repeat=True, shuffle=True).skip(start_step)

    def evaluation(name):
        ds = split(name, batch_size=loop.eval_batch_size(config), shuffle=False)
        return ds.take(d.eval_batches) if d.eval_batches else ds

    def train_target_counts():
        counts = np.zeros(tokenizer.vocab_size, np.int64)
        for _, targets in split("train", batch_size=256, shuffle=False).as_numpy_iterator():
            counts += np.bincount(targets.ravel(), minlength=tokenizer.vocab_size)
        return counts

    return LmData(
        vocab_size=tokenizer.vocab_size,
        make_train=make_train,
        validation=evaluation("validation"),
        test=evaluation("test"),
        train_target_counts=train_target_counts,
        tokenizer=tokenizer,
    )


def evaluation_targets(batches):
    """<int>[N] of every target in evaluation `batches` (either kind)."""
    if hasattr(batches, "as_numpy_iterator"):
        batches = batches.as_numpy_iterator()
    return np.concatenate([np.asarray(t).ravel() for _, t in batches])


def unigram_perplexity(data):
    """Add-one unigram perplexity: counts from the train split, scored on
    the same test targets the model is scored on."""
    return loop.unigram_perplexity(data.train_target_counts(), evaluation_targets(data.test))

