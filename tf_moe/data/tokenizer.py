"""SentencePiece subword tokenizers, trained on a train split and cached.

Owns: training a SentencePiece unigram model with the `sentencepiece`
trainer on the train split of a tfds dataset (never validation or test),
caching it at `<data_dir>/<dataset>/<version>/vocab/`, and running it in
TensorFlow graphs with `tensorflow_text.SentencepieceTokenizer`.

Training is deterministic: the input is the train split in file order, cut
into sentences, the first `max_sentences` of them, with SentencePiece's own
sampling and shuffling turned off; the same data gives the same model bytes.
Ids: 0 padding, 1 unknown, 2 begin of sequence, 3 end of sequence, then
256 byte pieces (byte fallback: no text maps to unknown), then subwords.
"""

import io
import os
import pathlib
import tempfile

import sentencepiece
import tensorflow as tf
import tensorflow_datasets as tfds
import tensorflow_text

from tf_moe.data import cleaning

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3
DEFAULT_VOCAB_SIZE = 8000
DEFAULT_MAX_SENTENCES = 1_000_000
MIN_VOCAB_SIZE = 300


class Tokenizer:
    """A SentencePiece model usable inside `tf.data` and `tf.function`.

    Args:
        model: bytes of a serialized SentencePiece model.
    """

    pad_id = PAD_ID
    unk_id = UNK_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, model):
        self.model = model
        self._tokenizer = tensorflow_text.SentencepieceTokenizer(
            model=model, out_type=tf.int32
        )
        self.vocab_size = int(self._tokenizer.vocab_size())

    def tokenize(self, texts):
        """str tensor [...] -> <int32> ragged [..., (tokens)] (no BOS/EOS)."""
        return self._tokenizer.tokenize(texts)

    def detokenize(self, ids):
        """<int32> [B, L] (dense, padding/BOS/EOS dropped) or ragged -> str [B].

        Dense rows are cut at their first EOS; ids 0, 2 and 3 are removed.
        """
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.convert_to_tensor(ids, tf.int32)
            is_eos = tf.cast(tf.equal(ids, EOS_ID), tf.int32)
            before_eos = tf.equal(tf.cumsum(is_eos, axis=-1), 0)
            ids = tf.ragged.boolean_mask(ids, before_eos)
        keep = (ids != PAD_ID) & (ids != BOS_ID) & (ids != EOS_ID)
        return self._tokenizer.detokenize(tf.ragged.boolean_mask(ids, keep))

    def id_to_piece(self, ids):
        """Subword strings of `ids`."""
        return self._tokenizer.id_to_string(ids)


def train_model(texts, vocab_size, max_sentences=DEFAULT_MAX_SENTENCES):
    """Trains a unigram SentencePiece model on an iterable of str.

    Args:
        texts: iterable of str (paragraphs or sentences).
        vocab_size: target vocabulary size including the 4 special ids and
            256 byte pieces, >= MIN_VOCAB_SIZE; a smaller vocabulary is
            produced when the text has too few pieces.
        max_sentences: at most this many sentences are used (the first ones).

    Returns:
        bytes, the serialized model.

    Raises:
        ValueError: bad `vocab_size`/`max_sentences`, or no text.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (4 special ids, 256 byte "
            f"pieces and the text's characters). Received: vocab_size={vocab_size}"
        )
    if max_sentences < 1:
        raise ValueError(
            f"max_sentences must be >= 1. Received: max_sentences={max_sentences}"
        )
    sentences = []
    for text in texts:
        sentences.extend(cleaning.split_sentences(text))
        if len(sentences) >= max_sentences:
            break
    del sentences[max_sentences:]
    if not sentences:
        raise ValueError("No text to train the tokenizer on.")
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=0.9995,
        input_sentence_size=0,  # use every sentence: no random sampling
        shuffle_input_sentence=False,
        max_sentence_length=16384,
        hard_vocab_limit=False,
        # Characters outside the vocabulary become UTF-8 byte pieces, so
        # detokenize(tokenize(text)) == text for any text (no <unk>).
        byte_fallback=True,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    return model.getvalue()


def _text_fields(features):
    if isinstance(features, tfds.features.Translation):
        return list(features.languages)
    if "text" in features:
        return ["text"]
    raise ValueError(
        "Cannot find text to train a tokenizer on: expected a Translation "
        f"feature or a 'text' feature. Received features: {features}"
    )


def vocab_path(builder, data_dir, vocab_size):
    """Where the model of `builder` with `vocab_size` pieces is cached.

    `<data_dir>/<name>[/<config>]/<version>/vocab/spm_unigram_<size>.model`;
    `data_dir` is taken from the caller (not `builder.data_dir`, which
    `tfds.testing.mock_data` points at tfds's own package files).
    """
    root = pathlib.Path(data_dir or tfds.core.constants.DATA_DIR).expanduser()
    return root / builder.info.full_name / "vocab" / f"spm_unigram_{vocab_size}.model"


def _train_texts(builder, fields):
    dataset = builder.as_dataset(split="train", shuffle_files=False)
    # Batched: per-example iteration through tfds.as_numpy is ~10x slower.
    dataset = dataset.map(lambda example: [example[f] for f in fields]).batch(1024)
    for columns in dataset.as_numpy_iterator():
        for row in zip(*columns):
            for text in row:
                yield text.decode("utf-8", "replace")


def load_or_train(
    name, data_dir=None, vocab_size=DEFAULT_VOCAB_SIZE, max_sentences=DEFAULT_MAX_SENTENCES
):
    """The tokenizer of tfds dataset `name`, trained on its train split once.

    Args:
        name: tfds name, e.g. "tf_moe_lm_en", "lm1b", "wmt14_translate/de-en".
            Translation datasets get one model for both languages.
        data_dir: tfds data_dir (default: tfds's, ~/tensorflow_datasets).
        vocab_size: see `train_model`.
        max_sentences: see `train_model`.

    Returns:
        `Tokenizer`.
    """
    builder = tfds.builder(name, data_dir=data_dir)
    path = vocab_path(builder, data_dir, vocab_size)
    if path.is_file():
        return Tokenizer(path.read_bytes())
    model = train_model(
        _train_texts(builder, _text_fields(builder.info.features)),
        vocab_size,
        max_sentences,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: a killed run leaves no half-written model behind.
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as f:
        f.write(model)
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)
    return Tokenizer(model)
