"""Tests for tf_moe.data.token_cache: export, checks, Grain loader, no TF.

The tiny `tiny_lm` corpus of tests/tiny_corpora.py is exported once; the
reference for the windows and batches is the existing `tf.data` pipeline
(`pipeline.lm_dataset`) and tokenizer (`Tokenizer.detokenize`). The last
test reads the cache in a subprocess where TensorFlow cannot be imported.
The cache code does not use Keras; both backends run it (see BUILD).
"""

import itertools
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from etils import epath
import grain
import numpy as np

from tf_moe.data import pipeline
from tf_moe.data import token_cache
from tf_moe.data import tokenizer as tokenizer_lib

import tiny_corpora

VOCAB_SIZE = 300
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def setUpModule():
    global DATA_DIR, CACHE_DIR, TOKENIZER
    DATA_DIR = tempfile.mkdtemp(prefix="token_cache_test_")
    tiny_corpora.TinyLm(data_dir=DATA_DIR).download_and_prepare()
    TOKENIZER = tokenizer_lib.load_or_train(
        tiny_corpora.TinyLm.name, DATA_DIR, VOCAB_SIZE
    )
    CACHE_DIR = os.path.join(DATA_DIR, "cache")
    token_cache.export_lm_cache(tiny_corpora.TinyLm.name, DATA_DIR, CACHE_DIR, TOKENIZER)


def tearDownModule():
    shutil.rmtree(DATA_DIR, ignore_errors=True)


def _env(**values):
    """This process's environment, the repository first on PYTHONPATH."""
    env = dict(os.environ, **values)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + paths)
    return env


def _rows(windows):
    """[W, L + 1] array of windows as a sorted list of bytes (a multiset)."""
    return sorted(row.tobytes() for row in windows)


def _epoch_windows(loader, count):
    """`count` single-window batches as [count, L + 1] (inputs + last target)."""
    batches = [next(loader) for _ in range(count)]
    return np.stack([np.concatenate([x[0], y[0, -1:]]) for x, y in batches])


def _assert_batches_equal(test, actual, expected):
    test.assertEqual(len(actual), len(expected))
    for (x, y), (ex, ey) in zip(actual, expected):
        test.assertEqual(x.dtype, np.int32)
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


class ExportTest(absltest.TestCase):

    def test_manifest_describes_files(self):
        cache = token_cache.load_lm_cache(CACHE_DIR)
        manifest = json.loads(pathlib.Path(CACHE_DIR, "manifest.json").read_text())
        self.assertEqual(cache.manifest, manifest)
        self.assertEqual(manifest["format"], token_cache.FORMAT)
        self.assertEqual(manifest["version"], token_cache.VERSION)
        self.assertEqual(cache.corpus, tiny_corpora.TinyLm.name)
        self.assertEqual(cache.vocab_size, TOKENIZER.vocab_size)
        self.assertEqual(cache.splits, ("train", "validation", "test"))
        self.assertEqual(cache.spm_model, TOKENIZER.model)
        for split in cache.splits:
            tokens = cache.tokens(split)
            self.assertIsInstance(tokens, np.memmap)
            self.assertFalse(tokens.flags.writeable)
            self.assertEqual(manifest["splits"][split]["tokens"], len(tokens))
            # One EOS per document.
            examples = {"train": 1500, "validation": 100, "test": 100}[split]
            self.assertEqual(int(np.sum(tokens == token_cache.EOS_ID)), examples)
            self.assertEqual(tokens[-1], token_cache.EOS_ID)

    def test_command_line(self):
        out = os.path.join(self.create_tempdir().full_path, "cache")
        result = subprocess.run(
            [sys.executable, "-m", "tf_moe.data.token_cache",
             f"--corpus={tiny_corpora.TinyLm.name}", f"--data_dir={DATA_DIR}",
             f"--out={out}", f"--vocab_size={VOCAB_SIZE}", "--splits=validation"],
            env=_env(), capture_output=True, text=True, timeout=240,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        manifest = token_cache.load_lm_cache(out).manifest
        self.assertEqual(json.loads(result.stdout), manifest)
        expected = token_cache.load_lm_cache(CACHE_DIR).manifest
        self.assertEqual(
            manifest["splits"], {"validation": expected["splits"]["validation"]}
        )
        self.assertEqual(manifest["tokenizer"], expected["tokenizer"])

    def test_ids_match_tokenizer_module(self):
        self.assertEqual(token_cache.PAD_ID, tokenizer_lib.PAD_ID)
        self.assertEqual(token_cache.BOS_ID, tokenizer_lib.BOS_ID)
        self.assertEqual(token_cache.EOS_ID, tokenizer_lib.EOS_ID)

    def test_existing_out_dir_is_refused(self):
        with self.assertRaisesRegex(FileExistsError, "out_dir"):
            token_cache.export_lm_cache(
                tiny_corpora.TinyLm.name, DATA_DIR, CACHE_DIR, TOKENIZER
            )

    def test_failed_export_leaves_no_cache(self):
        parent = tempfile.mkdtemp(dir=DATA_DIR)
        out = os.path.join(parent, "cache")
        with self.assertRaisesRegex(ValueError, "no_such_split"):  # from tfds
            token_cache.export_lm_cache(
                tiny_corpora.TinyLm.name, DATA_DIR, out, TOKENIZER,
                splits=("validation", "no_such_split"),
            )
        self.assertEqual(os.listdir(parent), [])

    def test_bad_splits(self):
        for splits in [("train[:10%]",), (), ("train", "train"), ("a/b",)]:
            with self.assertRaisesRegex(ValueError, "splits"):
                token_cache.export_lm_cache(
                    tiny_corpora.TinyLm.name, DATA_DIR, "/nonexistent/x", TOKENIZER,
                    splits=splits,
                )


class LoaderTest(parameterized.TestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.cache = token_cache.load_lm_cache(CACHE_DIR)

    @parameterized.product(
        split=["validation", "test", "train"], shape=[(16, 4), (7, 3), (1, 1)]
    )
    def test_unshuffled_equals_lm_dataset(self, split, shape):
        seq_len, batch_size = shape
        actual = list(
            token_cache.lm_loader(self.cache, split, seq_len, batch_size, shuffle=False)
        )
        expected = list(
            pipeline.lm_dataset(
                tiny_corpora.TinyLm.name, split, seq_len, batch_size, DATA_DIR,
                tokenizer=TOKENIZER, shuffle=False,
            ).as_numpy_iterator()
        )
        self.assertNotEmpty(expected)
        _assert_batches_equal(self, actual, expected)

    def test_shuffled_epochs_hold_every_window_once(self):
        seq_len = 16
        source = token_cache.LmWindows(self.cache.tokens("train"), seq_len)
        count = len(source)
        windows = np.stack(
            [np.concatenate([x, y[-1:]]) for x, y in (source[i] for i in range(count))]
        )
        tokens = self.cache.tokens("train")
        np.testing.assert_array_equal(
            windows, tokens[: count * (seq_len + 1)].reshape(count, seq_len + 1)
        )

        def epochs(seed, number=2):
            loader = token_cache.lm_loader(
                self.cache, "train", seq_len, 1, seed=seed, repeat=True
            )
            return [_epoch_windows(loader, count) for _ in range(number)]

        first, second = epochs(seed=0)
        other_seed, _ = epochs(seed=1)
        for epoch in (first, second, other_seed):
            self.assertEqual(_rows(epoch), _rows(windows))
        self.assertFalse(np.array_equal(first, windows))
        self.assertFalse(np.array_equal(first, second))
        self.assertFalse(np.array_equal(first, other_seed))
        # Grain seeds epoch e of shuffle(seed=s) with s + e; the loader
        # hashes the seed first, so seed 1 is not seed 0 one epoch later.
        self.assertFalse(np.array_equal(second, other_seed))
        # Same seed, same order.
        np.testing.assert_array_equal(epochs(seed=0, number=1)[0], first)

    def test_batched_gather_equals_grain_batches_of_windows(self):
        """`lm_loader` shuffles and batches indices, then gathers; the batches
        equal Grain's shuffled batches of `LmWindows` elements (the
        per-window path), across an epoch boundary, and `take` equals the
        windows one by one."""
        seq_len, batch_size = 16, 8
        source = token_cache.LmWindows(self.cache.tokens("train"), seq_len)
        rows = [5, 0, len(source) - 1, 5]
        x, y = source.take(rows)
        for j, i in enumerate(rows):
            np.testing.assert_array_equal(x[j], source[i][0])
            np.testing.assert_array_equal(y[j], source[i][1])
        per_window = (
            grain.MapDataset.source(source).seed(4).shuffle().repeat()
            .batch(batch_size, drop_remainder=True)
        )
        count = 2 * len(source) // batch_size + 3  # past two epochs
        loader = token_cache.lm_loader(self.cache, "train", seq_len, batch_size, seed=4,
                                       repeat=True)
        actual = list(itertools.islice(loader, count))
        _assert_batches_equal(self, actual, [per_window[b] for b in range(count)])

    def test_shuffled_without_repeat_is_one_epoch(self):
        batches = list(token_cache.lm_loader(self.cache, "train", 16, 1, seed=3))
        windows = token_cache.LmWindows(self.cache.tokens("train"), 16)
        self.assertLen(batches, len(windows))

    @parameterized.named_parameters(
        ("train_repeat_across_epochs", "train", True, True),
        ("train_one_epoch", "train", True, False),
        ("validation", "validation", False, False),
    )
    def test_resume_from_saved_state(self, split, shuffle, repeat):
        seq_len, batch_size = 16, 8
        windows = len(token_cache.LmWindows(self.cache.tokens(split), seq_len))
        taken = windows // batch_size - 3  # then 3 more batches in the epoch
        more = 6 if repeat else 3

        def loader():
            return token_cache.lm_loader(
                self.cache, split, seq_len, batch_size, shuffle=shuffle, seed=5,
                repeat=repeat,
            )

        uninterrupted = loader()
        expected = [next(uninterrupted) for _ in range(taken + more)][taken:]
        interrupted = loader()
        for _ in range(taken):
            next(interrupted)
        checkpoint = json.dumps(interrupted.get_state()).encode()
        del interrupted
        resumed = loader()
        resumed.set_state(json.loads(checkpoint.decode()))
        actual = [next(resumed) for _ in range(more)]
        _assert_batches_equal(self, actual, expected)
        if not repeat:
            self.assertEqual(list(resumed), [])

    def test_grain_orbax_handler_saves_and_restores(self):
        def loader():
            return token_cache.lm_loader(self.cache, "train", 16, 8, seed=2, repeat=True)

        uninterrupted = loader()
        expected = [next(uninterrupted) for _ in range(7)][4:]
        interrupted = loader()
        for _ in range(4):
            next(interrupted)
        directory = epath.Path(self.create_tempdir().full_path)
        grain.checkpoint.CheckpointHandler().save(directory, interrupted)
        resumed = grain.checkpoint.CheckpointHandler().restore(directory, loader())
        _assert_batches_equal(self, [next(resumed) for _ in range(3)], expected)

    def test_state_of_other_loader_is_refused(self):
        base = dict(split="train", seq_len=16, batch_size=8, seed=0)
        loader = token_cache.lm_loader(self.cache, **base)
        next(loader)
        state = loader.get_state()
        for change in [
            dict(seed=1), dict(seq_len=8), dict(batch_size=4), dict(shuffle=False),
            dict(repeat=True), dict(split="validation", batch_size=1),
        ]:
            with self.subTest(change=change):
                other = token_cache.lm_loader(self.cache, **{**base, **change})
                with self.assertRaisesRegex(ValueError, "another loader"):
                    other.set_state(state)

    def test_bad_arguments_name_the_argument(self):
        cases = [
            (dict(split="dev"), "split must be one of"),
            (dict(seq_len=0), "seq_len"),
            (dict(seq_len=2.5), "seq_len"),
            (dict(batch_size=0), "batch_size"),
            (dict(seed=-1), "seed"),
            (dict(seq_len=10**7), "seq_len is too large.*seq_len=10000000"),
            (dict(split="validation", batch_size=10**6), "batch_size=1000000"),
        ]
        for change, pattern in cases:
            arguments = {**dict(split="train", seq_len=16, batch_size=4), **change}
            with self.subTest(change=change):
                with self.assertRaisesRegex(ValueError, pattern):
                    token_cache.lm_loader(self.cache, **arguments)
        with self.assertRaisesRegex(ValueError, "split must be one of"):
            self.cache.tokens("dev")
        with self.assertRaisesRegex(ValueError, "ids"):
            self.cache.detokenize(np.zeros([2, 3, 4], np.int32))

    def test_detokenize_matches_tokenizer(self):
        rows = np.array(self.cache.tokens("validation")[: 4 * 24]).reshape(4, 24)
        rows[1, 5] = token_cache.EOS_ID  # cut here
        rows[2, :3] = token_cache.BOS_ID
        rows[3, -4:] = token_cache.PAD_ID
        expected = [s.decode() for s in TOKENIZER.detokenize(rows).numpy()]
        self.assertEqual(self.cache.detokenize(rows), expected)
        self.assertEqual(self.cache.detokenize(rows[1]), expected[1])
        self.assertNotIn("\x00", "".join(expected))


class DamageTest(absltest.TestCase):

    def setUp(self):
        super().setUp()
        self.copy = pathlib.Path(self.create_tempdir().full_path) / "cache"
        shutil.copytree(CACHE_DIR, self.copy)
        self.manifest = json.loads((self.copy / "manifest.json").read_text())

    def test_flipped_byte(self):
        path = self.copy / "train.npy"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        expected = self.manifest["splits"]["train"]["sha256"]
        actual = token_cache._sha256(path)  # pylint: disable=protected-access
        with self.assertRaisesRegex(ValueError, f"{path}.*{actual}.*{expected}"):
            token_cache.load_lm_cache(self.copy)

    def test_truncated_file(self):
        path = self.copy / "validation.npy"
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size - 4)
        with self.assertRaisesRegex(ValueError, f"{path}.*truncated"):
            token_cache.load_lm_cache(self.copy)

    def test_damaged_tokenizer(self):
        path = self.copy / "spm.model"
        data = bytearray(path.read_bytes())
        data[100] ^= 0x80
        path.write_bytes(bytes(data))
        with self.assertRaisesRegex(ValueError, f"{path} is damaged.*SHA-256"):
            token_cache.load_lm_cache(self.copy)
        path.write_bytes(bytes(data[:-1]))
        with self.assertRaisesRegex(ValueError, f"{path} has .* bytes.*truncated"):
            token_cache.load_lm_cache(self.copy)

    def test_missing_manifest(self):
        (self.copy / "manifest.json").unlink()
        pattern = f"cache_dir='{self.copy}'.*manifest.json"
        with self.assertRaisesRegex(FileNotFoundError, pattern):
            token_cache.load_lm_cache(self.copy)

    def test_missing_split_file(self):
        (self.copy / "test.npy").unlink()
        pattern = f"{self.copy / 'test.npy'} is missing"
        with self.assertRaisesRegex(FileNotFoundError, pattern):
            token_cache.load_lm_cache(self.copy)

    def test_other_version(self):
        self.manifest["version"] = 99
        (self.copy / "manifest.json").write_text(json.dumps(self.manifest))
        with self.assertRaisesRegex(ValueError, "version=99"):
            token_cache.load_lm_cache(self.copy)

    def test_bad_manifest(self):
        path = self.copy / "manifest.json"
        test_entry = self.manifest["splits"]["test"]
        outside = {**test_entry, "file": "../x.npy"}
        outside = {**self.manifest, "splits": {"test": outside}}
        no_count = {**test_entry}
        del no_count["tokens"]
        no_count = {**self.manifest, "splits": {"test": no_count}}
        for text in ["{not json", "[]", json.dumps(outside), json.dumps(no_count)]:
            with self.subTest(text=text[:40]):
                path.write_text(text)
                with self.assertRaisesRegex(ValueError, f"{path} is not valid"):
                    token_cache.load_lm_cache(self.copy)


# Run with TensorFlow, tensorflow_datasets and tensorflow_text unimportable
# (as if not installed): open the cache, read batches, detokenize.
_WITHOUT_TENSORFLOW = """
import importlib.abc, json, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("tensorflow", "tensorflow_datasets", "tensorflow_text"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, NoTensorFlow())
from tf_moe.data import token_cache
import tf_moe.data

cache = token_cache.load_lm_cache(sys.argv[1])
loader = token_cache.lm_loader(cache, "train", 16, 4, seed=7, repeat=True)
batches = [next(loader) for _ in range(3)]
state = json.dumps(loader.get_state())
try:
    tf_moe.data.lm_dataset
    pipeline_error = None
except ImportError as error:
    pipeline_error = str(error)
print(json.dumps({
    "batches": [[x.tolist(), y.tolist()] for x, y in batches],
    "state": state,
    "text": cache.detokenize(batches[0][0][0]),
    "pipeline_error": pipeline_error,
    "tensorflow_modules": sorted(
        m for m in sys.modules if m.split(".")[0].startswith("tensorflow")
    ),
}))
"""


class WithoutTensorFlowTest(absltest.TestCase):

    def test_reads_cache_without_tensorflow(self):
        result = subprocess.run(
            [sys.executable, "-c", _WITHOUT_TENSORFLOW, CACHE_DIR],
            env=_env(KERAS_BACKEND="jax", JAX_PLATFORMS="cpu"),
            capture_output=True,
            text=True,
            timeout=240,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        output = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual(output["tensorflow_modules"], [])
        self.assertIn("token_cache", output["pipeline_error"])

        cache = token_cache.load_lm_cache(CACHE_DIR)
        loader = token_cache.lm_loader(cache, "train", 16, 4, seed=7, repeat=True)
        expected = [next(loader) for _ in range(3)]
        actual = [
            (np.array(x, np.int32), np.array(y, np.int32)) for x, y in output["batches"]
        ]
        _assert_batches_equal(self, actual, expected)
        self.assertEqual(json.loads(output["state"]), loader.get_state())
        self.assertEqual(output["text"], cache.detokenize(expected[0][0][0]))


if __name__ == "__main__":
    absltest.main()
