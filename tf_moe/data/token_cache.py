"""Token caches: a language-modelling corpus tokenized once, read without TF.

    python -m tf_moe.data.token_cache --corpus=tf_moe_lm_en \
        --data_dir=~/tensorflow_datasets --out=/data/lm_en_cache

Owns: `export_lm_cache` (where TensorFlow is installed: every split's token
stream as one int32 `.npy` file, the SentencePiece model and a manifest of
SHA-256 digests), `load_lm_cache` (checks a cache and memory-maps it),
`LmWindows` (a Grain data source of one split's windows) and `lm_loader`
(Grain batches whose iterator state is saved and restored with a
checkpoint). Does not own tokenization itself (`tokenizer`) nor the
`tf.data` pipelines (`pipeline`). Only `export_lm_cache` imports TensorFlow,
inside the function: reading a cache needs NumPy, Grain and `sentencepiece`.

A split's stream is that of `pipeline.lm_dataset(..., shuffle=False)`: the
documents in tfds order (shuffle_files=False), each tokenized and followed
by EOS. Window i is `tokens[i * (L + 1) : (i + 1) * (L + 1)]` (an incomplete
last window is dropped); inputs are its first L tokens, targets its last L.
Unshuffled batches therefore equal `lm_dataset`'s batch for batch; shuffled
ones differ in kind: a global shuffle of the windows, a new order each epoch
(Grain's `MapDataset.shuffle`), not `tf.data`'s shuffle buffer.

Cache layout (`manifest.json` is written last, and the folder appears under
its name only complete, by a rename):

    <cache>/manifest.json   format, version, corpus, vocab_size, tokenizer
                            {file, bytes, sha256}, splits {split: {file,
                            tokens, bytes, sha256}}
    <cache>/<split>.npy     <int32>[N], the split's token stream
    <cache>/spm.model       the SentencePiece model (tokenizer.model bytes)

Shape letters: B batch, L sequence length, N tokens of a split.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile

from absl import app
from absl import flags
import grain
import numpy as np
import sentencepiece

# Ids of tokenizer.py (which imports TensorFlow, so they are repeated here).
PAD_ID = 0
BOS_ID = 2
EOS_ID = 3

FORMAT = "tf_moe_lm_token_cache"
VERSION = 1
MANIFEST = "manifest.json"
SPM_MODEL = "spm.model"
DEFAULT_SPLITS = ("train", "validation", "test")

# Documents are tokenized this many at a time (as in pipeline.py).
_TOKENIZE_BATCH = 256
# A split name is also a file name: no tfds slicing ("train[:1%]").
_SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")

FLAGS = flags.FLAGS


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _write_stream(path, chunks):
    """Writes <int32> arrays `chunks` as one 1-D `.npy` file; returns N.

    Memory stays at one chunk: the header is written for 0 tokens, the
    chunks appended, then the header rewritten with the count (NumPy pads
    the header so that it keeps its length as the count grows).
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<i4")),
              "fortran_order": False}
    count = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (0,)})
        data_offset = f.tell()
        for chunk in chunks:
            np.asarray(chunk, "<i4").tofile(f)
            count += len(chunk)
        f.seek(0)
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (count,)})
        if f.tell() != data_offset:
            raise RuntimeError(f"The .npy header of {path} changed length.")
    return count


def _token_chunks(name, split, data_dir, tokenizer):
    # Imported here: reading a cache must not need TensorFlow.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    from tf_moe.data import pipeline  # pylint: disable=g-import-not-at-top

    # The loading (and its error for an unprepared dataset) of lm_dataset.
    # pylint: disable-next=protected-access
    dataset = pipeline._load(name, split, data_dir, shuffle=False, seed=0)

    def tokenize(texts):
        ids = tokenizer.tokenize(texts)  # ragged [n, (tokens)]
        eos = tf.fill([tf.shape(texts)[0], 1], EOS_ID)
        return tf.concat([ids, eos], axis=1).flat_values

    dataset = (
        dataset.map(lambda example: example["text"])
        .batch(_TOKENIZE_BATCH)
        .map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    return dataset.as_numpy_iterator()


def _check_splits(splits):
    splits = tuple(splits)
    bad = [s for s in splits if not isinstance(s, str) or not _SPLIT_NAME.fullmatch(s)]
    if not splits or bad or len(set(splits)) != len(splits):
        raise ValueError(
            "splits must be distinct whole-split names of letters, digits and "
            "'_' (e.g. ('train', 'validation', 'test'); no slicing like "
            f"'train[:1%]'). Received: splits={splits!r}"
        )
    return splits


def export_lm_cache(
    name,
    data_dir,
    out_dir,
    tokenizer=None,
    vocab_size=None,
    splits=DEFAULT_SPLITS,
):
    """Tokenizes the splits of a tfds text dataset into a token cache.

    Needs TensorFlow, tensorflow_datasets and tensorflow_text (imported
    here). Writes into a temporary folder next to `out_dir` and renames it
    to `out_dir` when complete, so a killed export leaves no cache behind
    (only a `.<name>.incomplete-*` folder that can be deleted).

    Args:
        name: tfds name with a "text" feature ("tf_moe_lm_en", "lm1b").
        data_dir: tfds data_dir (None: tfds's default).
        out_dir: the cache folder to create; must not exist.
        tokenizer: a `tokenizer.Tokenizer`; default: the dataset's own
            (`tokenizer.load_or_train(name, data_dir, vocab_size)`).
        vocab_size: vocabulary size of the default tokenizer (None:
            `tokenizer.DEFAULT_VOCAB_SIZE`); unused with `tokenizer`.
        splits: whole tfds splits to export.

    Returns:
        The manifest (dict), as written to `<out_dir>/manifest.json`.

    Raises:
        ValueError: bad `splits`.
        FileExistsError: `out_dir` exists.
        FileNotFoundError: the dataset is not prepared in `data_dir`.
    """
    # pylint: disable-next=g-import-not-at-top
    from tf_moe.data import tokenizer as tokenizer_lib

    splits = _check_splits(splits)
    out_dir = pathlib.Path(out_dir).expanduser()
    if out_dir.exists():
        raise FileExistsError(
            "out_dir exists; remove it or choose another. "
            f"Received: out_dir={str(out_dir)!r}"
        )
    if tokenizer is None:
        if vocab_size is None:
            vocab_size = tokenizer_lib.DEFAULT_VOCAB_SIZE
        tokenizer = tokenizer_lib.load_or_train(name, data_dir, vocab_size)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = pathlib.Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.incomplete-", dir=out_dir.parent)
    )
    try:
        (temp_dir / SPM_MODEL).write_bytes(tokenizer.model)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "corpus": name,
            "vocab_size": int(tokenizer.vocab_size),
            "tokenizer": {
                "file": SPM_MODEL,
                "bytes": len(tokenizer.model),
                "sha256": _sha256(temp_dir / SPM_MODEL),
            },
            "splits": {},
        }
        for split in splits:
            path = temp_dir / f"{split}.npy"
            tokens = _write_stream(path, _token_chunks(name, split, data_dir, tokenizer))
            manifest["splits"][split] = {
                "file": path.name,
                "tokens": tokens,
                "bytes": path.stat().st_size,
                "sha256": _sha256(path),
            }
        (temp_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(temp_dir, 0o755)  # mkdtemp makes it 0o700
        os.rename(temp_dir, out_dir)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    return manifest


class LmCache:
    """An opened token cache: manifest, memory-mapped streams, tokenizer.

    Use `load_lm_cache`, which checks every file first.

    Attributes:
        cache_dir: `pathlib.Path` of the cache.
        manifest: the manifest (dict).
        corpus: tfds name it was exported from.
        vocab_size: vocabulary size of the tokenizer.
        splits: tuple of split names.
        spm_model: bytes of the SentencePiece model.
    """

    def __init__(self, cache_dir, manifest, arrays, spm_model):
        self.cache_dir = cache_dir
        self.manifest = manifest
        self.corpus = manifest["corpus"]
        self.vocab_size = manifest["vocab_size"]
        self.splits = tuple(manifest["splits"])
        self.spm_model = spm_model
        self._arrays = arrays
        self._processor = sentencepiece.SentencePieceProcessor(model_proto=spm_model)

    def tokens(self, split):
        """<int32>[N], the memory-mapped (read-only) token stream of `split`."""
        _check_split(self, split)
        return self._arrays[split]

    def detokenize(self, ids):
        """<int>[L] -> str, or [B, L] -> list of B str.

        As `tokenizer.Tokenizer.detokenize` on dense ids: each row is cut at
        its first EOS, then ids 0 (pad), 2 (BOS) and 3 (EOS) are removed.
        """
        ids = np.asarray(ids)
        if ids.ndim not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(
                "ids must be integers of shape [L] or [B, L]. Received: "
                f"ids with shape={ids.shape}, dtype={ids.dtype}"
            )
        rows = [self._detokenize_row(row) for row in ids.reshape(-1, ids.shape[-1])]
        return rows[0] if ids.ndim == 1 else rows

    def _detokenize_row(self, row):
        eos = np.flatnonzero(row == EOS_ID)
        row = row[: eos[0]] if len(eos) else row
        row = row[(row != PAD_ID) & (row != BOS_ID)]
        return self._processor.decode(row.tolist())

    def __repr__(self):
        return (
            f"LmCache({str(self.cache_dir)!r}, corpus={self.corpus!r}, "
            f"splits={self.splits})"
        )


def _check_file(path, size, sha256):
    actual_size = path.stat().st_size
    if actual_size != size:
        raise ValueError(
            f"Token cache file {path} has {actual_size} bytes, the manifest says "
            f"{size}: the file is truncated or damaged; export the cache again."
        )
    actual = _sha256(path)
    if actual != sha256:
        raise ValueError(
            f"Token cache file {path} is damaged: its SHA-256 is {actual}, the "
            f"manifest says {sha256}; export the cache again."
        )


def _manifest_problem(manifest):
    """What is wrong with a parsed manifest (str), or None."""
    try:
        if (manifest["format"], manifest["version"]) != (FORMAT, VERSION):
            return (
                f"format={manifest['format']!r}, version={manifest['version']}; "
                f"this code reads format={FORMAT!r}, version={VERSION}"
            )
        int(manifest["vocab_size"]), str(manifest["corpus"])
        # File names are fixed, so a manifest cannot point outside the cache.
        files = {SPM_MODEL: manifest["tokenizer"]}
        files.update({f"{split}.npy": e for split, e in manifest["splits"].items()})
        for file, entry in files.items():
            bad_size = int(entry["bytes"]) < 0
            if entry["file"] != file or bad_size or len(entry["sha256"]) != 64:
                return f"bad entry for {file}: {entry}"
        for entry in manifest["splits"].values():
            int(entry["tokens"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return f"a field is missing or malformed ({error!r})"
    return None


def _read_manifest(cache_dir):
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"No token cache in cache_dir={str(cache_dir)!r}: {path} is missing "
            "(the export did not finish, or this is not a cache). Export one with "
            "`python -m tf_moe.data.token_cache --corpus=... --out=...`."
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        problem = f"not JSON ({error})"
    else:
        problem = _manifest_problem(manifest)
    if problem:
        raise ValueError(f"Token cache manifest {path} is not valid: {problem}.")
    return manifest


def load_lm_cache(cache_dir):
    """Opens a token cache after checking every file's size and SHA-256.

    Args:
        cache_dir: folder written by `export_lm_cache`.

    Returns:
        `LmCache`, its streams memory-mapped (np.load mmap_mode="r").

    Raises:
        FileNotFoundError: no cache (no manifest) or a file of it missing;
            the message names the path.
        ValueError: a file whose size or SHA-256 differs from the manifest
            (the message names the file and both values), or a bad manifest.
    """
    cache_dir = pathlib.Path(cache_dir).expanduser()
    manifest = _read_manifest(cache_dir)
    entries = {SPM_MODEL: (manifest["tokenizer"], None)}
    for split, entry in manifest["splits"].items():
        entries[entry["file"]] = (entry, split)
    arrays = {}
    for file, (entry, split) in entries.items():
        path = cache_dir / file
        if not path.is_file():
            raise FileNotFoundError(
                f"Token cache in cache_dir={str(cache_dir)!r} is incomplete: {path} "
                "is missing; export the cache again."
            )
        _check_file(path, entry["bytes"], entry["sha256"])
        if split is None:
            continue
        array = np.load(path, mmap_mode="r")
        if array.dtype != np.int32 or array.shape != (entry["tokens"],):
            raise ValueError(
                f"Token cache file {path} holds {array.dtype}{list(array.shape)}, "
                f"the manifest says int32[{entry['tokens']}]."
            )
        arrays[split] = array
    return LmCache(cache_dir, manifest, arrays, (cache_dir / SPM_MODEL).read_bytes())


class LmWindows:
    """Grain data source: the (inputs, targets) windows of one token stream.

    Window i is `tokens[i * (L + 1) : (i + 1) * (L + 1)]`; the incomplete
    last window is dropped.

    Args:
        tokens: <int32>[N] (a memory-mapped `LmCache.tokens(split)`).
        seq_len: L, >= 1.
    """

    def __init__(self, tokens, seq_len):
        _check_positive(seq_len=seq_len)
        self._tokens = tokens
        self._seq_len = seq_len
        # [windows, L + 1]: a view of the (memory-mapped) stream, no copy.
        self._table = np.asarray(tokens[: len(self) * (seq_len + 1)]).reshape(
            len(self), seq_len + 1
        )

    def __len__(self):
        return len(self._tokens) // (self._seq_len + 1)

    def take(self, indices):
        """-> (inputs <int32>[B, L], targets <int32>[B, L]) of windows
        `indices` <int>[B]: one gather, not B reads (the batched path of
        `lm_loader`)."""
        windows = self._table[np.asarray(indices)]  # [B, L + 1], a copy
        return windows[:, :-1], windows[:, 1:]

    def __getitem__(self, index):
        """-> (inputs <int32>[L], targets <int32>[L])."""
        if not 0 <= index < len(self):
            raise IndexError(f"Window {index} out of range [0, {len(self)}).")
        window = np.array(self._table[index])
        return window[:-1], window[1:]

    def __repr__(self):  # Grain's DataLoader checkpoints name the source.
        return f"LmWindows(tokens={len(self._tokens)}, seq_len={self._seq_len})"


class LmIterator(grain.DatasetIterator):
    """Iterator of `lm_loader`: Grain's, with the loader's settings in its state.

    `get_state()` is a JSON-able dict; `set_state()` of it on an iterator of
    another cache, split or settings raises instead of quietly resuming on
    other data. A `grain.DatasetIterator`, so Grain's Orbax handler saves it.
    """

    def __init__(self, parent, settings):
        super().__init__(parent)
        self._settings = settings

    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return {"grain": self._parent.get_state(), "loader": dict(self._settings)}

    def set_state(self, state):
        saved = state.get("loader") if isinstance(state, dict) else None
        if saved != self._settings:
            raise ValueError(
                "This iterator state was saved by another loader (cache, split or "
                f"settings differ). Saved: {saved}. This loader: {self._settings}"
            )
        self._parent.set_state(state["grain"])

    def __str__(self):
        return f"LmIterator({self._settings})"


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"{name} must be an integer >= 1. Received: {name}={value!r}"
            )


def _check_split(cache, split):
    if split not in cache.splits:
        raise ValueError(
            f"split must be one of {cache.splits} (the cache's splits). "
            f"Received: split={split!r}"
        )


def lm_loader(
    cache, split, seq_len, batch_size, *, shuffle=None, seed=0, repeat=False, start=0
):
    """Grain batches of (inputs, targets) token windows, as `lm_dataset`.

    Windows as `LmWindows`; batches of `batch_size`, the incomplete last one
    dropped. Shuffled: `ds.seed(seed).shuffle()`, a global shuffle with a new
    order every epoch. With `repeat`, batches run on across epochs forever.
    `start` skips that many batches by random access (O(1), not by reading
    them): a trainer resuming at step s asks for `start=s`. Reads in the
    calling thread (the streams are memory-mapped; threads would only
    contend for the GIL).

    Args:
        cache: an `LmCache` (`load_lm_cache`).
        split: one of `cache.splits`.
        seq_len: L, >= 1.
        batch_size: B, >= 1.
        shuffle: shuffle windows; default True for "train" splits.
        seed: shuffling seed, an integer >= 0.
        repeat: repeat forever.
        start: index of the first batch to yield, an integer >= 0.

    Returns:
        `LmIterator` of (inputs <int32>[B, L], targets <int32>[B, L]) NumPy
        arrays, with `get_state()` / `set_state()`: a restored iterator
        yields the batches the uninterrupted one would have.

    Raises:
        ValueError: an unknown `split`; `seq_len`, `batch_size` < 1; `seed`
            < 0; a split with no window of `seq_len + 1` tokens, or (without
            `repeat`) fewer windows than `batch_size`; `start` < 0, or
            (without `repeat`) beyond the last batch.
    """
    _check_split(cache, split)
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0. Received: seed={seed!r}")
    if isinstance(start, bool) or not isinstance(start, (int, np.integer)) or start < 0:
        raise ValueError(f"start must be an integer >= 0. Received: start={start!r}")
    if shuffle is None:
        shuffle = split.startswith("train")
    source = LmWindows(cache.tokens(split), seq_len)
    if not len(source):
        raise ValueError(
            f"seq_len is too large: split {split!r} has {len(cache.tokens(split))} "
            f"tokens, fewer than one window of seq_len + 1. Received: seq_len={seq_len}"
        )
    if not repeat and len(source) < batch_size:
        raise ValueError(
            f"batch_size is larger than the {len(source)} windows of split {split!r} "
            "(seq_len + 1 tokens each), so there is no batch; use a smaller "
            f"batch_size or seq_len, or repeat=True. Received: batch_size={batch_size}"
        )
    # Grain shuffles and batches window *indices*; each batch is then one
    # gather from the stream (`LmWindows.take`). The same batches as batching
    # `LmWindows` elements, 3.8-3.9x the batches per second on 2 CPUs
    # (benchmarks/token_loader.py, docs/benchmarks.md).
    dataset = grain.MapDataset.range(len(source))
    if shuffle:
        # Not shuffle(seed=seed): Grain seeds epoch e with seed + e, so seed 1
        # would replay seed 0 one epoch later. ds.seed() hashes the seed first.
        dataset = dataset.seed(int(seed)).shuffle()
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.batch(batch_size, drop_remainder=True).map(source.take)
    if not repeat and start > len(dataset):
        raise ValueError(
            f"start is beyond the {len(dataset)} batches of split {split!r}. "
            f"Received: start={start}"
        )
    if start:
        dataset = dataset[start:]  # a slice of the MapDataset: random access
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    settings = {
        "corpus": cache.corpus,
        "split": split,
        "sha256": cache.manifest["splits"][split]["sha256"],
        "seq_len": int(seq_len),
        "batch_size": int(batch_size),
        "shuffle": bool(shuffle),
        "seed": int(seed),
        "repeat": bool(repeat),
        "start": int(start),
    }
    return LmIterator(iter(dataset.to_iter_dataset(read_options)), settings)


def _define_flags():
    flags.DEFINE_string(
        "corpus", None, "tfds name with a 'text' feature (tf_moe_lm_en, lm1b)."
    )
    flags.DEFINE_string("data_dir", None, "tfds data_dir (default: tfds's).")
    flags.DEFINE_string("out", None, "Cache folder to create (must not exist).")
    flags.DEFINE_integer(
        "vocab_size", None, "Vocabulary size of the dataset's tokenizer (default 8000)."
    )
    flags.DEFINE_list("splits", list(DEFAULT_SPLITS), "Splits to export.")
    flags.mark_flags_as_required(["corpus", "out"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    manifest = export_lm_cache(
        FLAGS.corpus,
        FLAGS.data_dir,
        FLAGS.out,
        vocab_size=FLAGS.vocab_size,
        splits=FLAGS.splits,
    )
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
