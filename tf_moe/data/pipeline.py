"""`tf.data` input pipelines of token ids for the trainers.

Owns: `lm_dataset` (next-token prediction windows) and `translation_dataset`
(source/target pairs), for the built-in corpora and for tfds's `lm1b` and
`wmt14_translate/de-en` alike: any dataset with a "text" feature, or a
Translation feature holding both languages.

Shape letters: B batch, L sequence length.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from tf_moe.data import tokenizer as tokenizer_lib

# Documents are tokenized this many at a time.
_TOKENIZE_BATCH = 256


def _load(name, split, data_dir, shuffle, seed):
    try:
        return tfds.load(
            name,
            split=split,
            data_dir=data_dir,
            download=False,
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
    except (AssertionError, FileNotFoundError) as error:
        raise FileNotFoundError(
            f"Dataset {name!r} is not prepared in data_dir={data_dir!r}. Build "
            "the built-in corpora with `python -m tf_moe.data.build "
            "--corpus=lm_en|translate_en_de --data_dir=...`; prepare tfds "
            "datasets with `tfds build`."
        ) from error


def _check_positive(**values):
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1. Received: {name}={value}")


def lm_dataset(
    name,
    split,
    seq_len,
    batch_size,
    data_dir=None,
    *,
    tokenizer=None,
    vocab_size=tokenizer_lib.DEFAULT_VOCAB_SIZE,
    shuffle=None,
    seed=0,
    repeat=False,
    shuffle_buffer=10_000,
):
    """Batches of (inputs, targets) token windows for language modelling.

    Every document is tokenized and followed by EOS; the token stream is cut
    into windows of `seq_len + 1` tokens; inputs are a window's first
    `seq_len` tokens, targets its last `seq_len` (shifted by one). An
    incomplete last window and batch are dropped.

    Args:
        name: tfds name with a "text" feature ("tf_moe_lm_en", "lm1b").
        split: tfds split ("train", "validation", "test", "train[:1%]").
        seq_len: L, tokens per example, >= 1.
        batch_size: B, >= 1.
        data_dir: tfds data_dir.
        tokenizer: a `tokenizer.Tokenizer`; default: the dataset's own,
            trained on its train split (`tokenizer.load_or_train`).
        vocab_size: vocabulary size of the default tokenizer.
        shuffle: shuffle files and windows; default True for "train" splits.
        seed: shuffling seed.
        repeat: repeat forever (before shuffling windows).
        shuffle_buffer: windows in the shuffle buffer.

    Returns:
        `tf.data.Dataset` of (inputs <int32>[B, L], targets <int32>[B, L]).
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    if tokenizer is None:
        tokenizer = tokenizer_lib.load_or_train(name, data_dir, vocab_size)
    if shuffle is None:
        shuffle = split.startswith("train")
    dataset = _load(name, split, data_dir, shuffle, seed)

    def tokenize(texts):
        ids = tokenizer.tokenize(texts)  # ragged [n, (tokens)]
        eos = tf.fill([tf.shape(texts)[0], 1], tokenizer_lib.EOS_ID)
        return tf.concat([ids, eos], axis=1).flat_values

    dataset = (
        dataset.map(lambda example: example["text"])
        .batch(_TOKENIZE_BATCH)
        .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
        .unbatch()
        .batch(seq_len + 1, drop_remainder=True)
    )
    if repeat:
        dataset = dataset.repeat()
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    dataset = dataset.map(lambda window: (window[:-1], window[1:]))
    return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def translation_dataset(
    name,
    split,
    max_length,
    batch_size,
    data_dir=None,
    *,
    source_language="en",
    target_language="de",
    tokenizer=None,
    vocab_size=tokenizer_lib.DEFAULT_VOCAB_SIZE,
    shuffle=None,
    seed=0,
    repeat=False,
    shuffle_buffer=10_000,
    drop_remainder=True,
):
    """Padded batches of token ids for sequence-to-sequence translation.

    For source tokens s and target tokens t (one joint vocabulary):
    source = s + [EOS], target_in = [BOS] + t, target_out = t + [EOS], each
    cut to `max_length` and padded with 0 (PAD_ID) to exactly `max_length`.

    Args:
        name: tfds name with a Translation feature
            ("tf_moe_translate_en_de", "wmt14_translate/de-en").
        split, batch_size, data_dir, tokenizer, vocab_size, shuffle, seed,
            repeat, shuffle_buffer: as in `lm_dataset`.
        max_length: L, >= 2.
        source_language, target_language: feature keys, e.g. "en", "de".
        drop_remainder: drop an incomplete last batch (keep for evaluation).

    Returns:
        `tf.data.Dataset` of ({"source": <int32>[B, L],
        "target_in": <int32>[B, L]}, target_out <int32>[B, L]).
    """
    _check_positive(batch_size=batch_size)
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2. Received: max_length={max_length}")
    if tokenizer is None:
        tokenizer = tokenizer_lib.load_or_train(name, data_dir, vocab_size)
    if shuffle is None:
        shuffle = split.startswith("train")
    dataset = _load(name, split, data_dir, shuffle, seed)
    if repeat:
        dataset = dataset.repeat()
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)

    def pad(ids):  # ragged [B, (n)] -> [B, L]
        return ids[:, :max_length].to_tensor(
            default_value=tokenizer_lib.PAD_ID, shape=[None, max_length]
        )

    def encode(examples):
        source = tokenizer.tokenize(examples[source_language])
        target = tokenizer.tokenize(examples[target_language])
        count = tf.shape(examples[source_language])[0]
        eos = tf.fill([count, 1], tokenizer_lib.EOS_ID)
        bos = tf.fill([count, 1], tokenizer_lib.BOS_ID)
        features = {
            "source": pad(tf.concat([source, eos], axis=1)),
            "target_in": pad(tf.concat([bos, target], axis=1)),
        }
        return features, pad(tf.concat([target, eos], axis=1))

    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE).prefetch(
        tf.data.AUTOTUNE
    )
