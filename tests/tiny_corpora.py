"""Two tiny synthetic tfds datasets for trainer tests (no network, seconds to
build): `tiny_lm` (text with a learnable grammar) and `tiny_translate`
(Translation en/de where German is a deterministic word-by-word mapping).

`prepare(data_dir)` builds both into `data_dir`; a trainer process started
afterwards loads them by name from that data_dir (tfds reads prepared
datasets from files, no builder class needed).
"""

import random

import tensorflow_datasets as tfds

_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "our neighbour", "a bird"]
_VERBS = ["sees", "likes", "finds", "helps", "follows", "calls"]
_OBJECTS = ["the house", "a tree", "the river", "my book", "the garden", "a car"]
_PLACES = ["today", "at night", "in the morning", "again", "quickly", "with joy"]
_GERMAN = {
    "the": "das", "a": "ein", "my": "mein", "our": "unser", "cat": "katze",
    "dog": "hund", "friend": "freund", "teacher": "lehrer", "neighbour": "nachbar",
    "bird": "vogel", "sees": "sieht", "likes": "mag", "finds": "findet",
    "helps": "hilft", "follows": "folgt", "calls": "ruft", "house": "haus",
    "tree": "baum", "river": "fluss", "book": "buch", "garden": "garten",
    "car": "auto", "today": "heute", "at": "bei", "night": "nacht", "in": "am",
    "morning": "morgen", "again": "wieder", "quickly": "schnell", "with": "mit",
    "joy": "freude",
}


def _sentences(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        yield " ".join(
            rng.choice(words) for words in (_SUBJECTS, _VERBS, _OBJECTS, _PLACES)
        ) + "."


def _german(sentence):
    return " ".join(_GERMAN[w] for w in sentence[:-1].split()) + "."


_SPLITS = {"train": (1500, 0), "validation": (100, 1), "test": (100, 2)}


class TinyLm(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()})
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*args) for split, args in _SPLITS.items()}

    def _generate_examples(self, count, seed):
        # Paragraphs of 4 sentences, like real documents.
        sentences = list(_sentences(count * 4, seed))
        for i in range(count):
            yield i, {"text": " ".join(sentences[4 * i : 4 * i + 4])}


class TinyTranslate(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.Translation(languages=("de", "en"))
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(*args) for split, args in _SPLITS.items()}

    def _generate_examples(self, count, seed):
        for i, sentence in enumerate(_sentences(count, seed + 10)):
            yield i, {"en": sentence, "de": _german(sentence)}


def prepare(data_dir):
    """Builds tiny_lm and tiny_translate into `data_dir`; returns their names."""
    for builder in (TinyLm(data_dir=data_dir), TinyTranslate(data_dir=data_dir)):
        builder.download_and_prepare()
    return TinyLm.name, TinyTranslate.name


def tiny_lstm_flags(vocab_size, steps, checkpoint_every):
    """Trainer flags of the tiny LSTM-MoE on `tiny_lm` that the trainer tests
    run (a few seconds a run; add the data source's own flags)."""
    return [
        "--config=configs/lstm_moe_tiny.py",
        "--config.data.corpus=tiny_lm",
        f"--config.data.vocab_size={vocab_size}",
        "--config.data.sequence_length=16",
        "--config.data.eval_batches=4",
        "--config.model.dim=32",
        "--config.model.expert_hidden_dim=32",
        "--config.model.num_experts=4",
        "--config.model.k=2",
        "--config.model.group_size=64",
        "--config.train.batch_size=8",
        f"--config.train.steps={steps}",
        f"--config.train.checkpoint_every={checkpoint_every}",
        "--config.train.warmup_steps=4",
        "--config.train.learning_rate=0.03",
    ]
