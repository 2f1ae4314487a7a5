r"""Trains a Transformer-MoE (Switch / GShard / ST-MoE) with absl flags: a
decoder-only language model (`--config.task=lm`) or an encoder-decoder
translation model (`--config.task=translate`).

    python -m trainers.transformer_moe \
        --config=configs/transformer_moe_tiny_translate.py \
        --workdir=/tmp/transformer_moe [--config.eval.beam_size=4] [--tpu=NAME]

The backend comes from KERAS_BACKEND. A run resumes automatically from the
newest good checkpoint in --workdir (`trainers.loop.fit`). At the end it
evaluates validation and test perplexity (both tasks) and, for translation,
BLEU (sacrebleu's corpus BLEU on detokenized text against the raw reference
sentences) with greedy and beam-search decoding; prints them with total vs
active parameters per token and tokens/s, and writes <workdir>/summary.json.
"""

import time

import keras
import numpy as np
from absl import app, flags
from keras import ops
from ml_collections import config_flags

from tf_moe.models import build_decoder_lm, build_encoder_decoder, decoding
from tf_moe.models.transformer_moe import check_model_config
from trainers import distribution, lm_data, loop

# TensorFlow, tfds and sacrebleu are imported where translation needs them:
# `task=lm` with `data.source=token_cache` runs without them.

TASKS = ("lm", "translate")
# The built-in corpus of each task (built on first use unless --nobuild_data):
# the names of tf_moe.data.TfMoeLmEn / TfMoeTranslateEnDe (tests check it),
# spelled out so that this module imports without TensorFlow.
BUILT_IN_CORPORA = {"lm": "tf_moe_lm_en", "translate": "tf_moe_translate_en_de"}

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/transformer_moe_tiny_translate.py", "Path to a config file (configs/*.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard, summary.")
_BUILD_DATA = flags.DEFINE_bool(
    "build_data", True, "Build the built-in corpus first if it is missing."
)
flags.mark_flag_as_required("workdir")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


def check_config(config):
    """Raises ValueError naming the first invalid config field."""
    if config.task not in TASKS:
        raise ValueError(f"`config.task` must be one of {TASKS}. Received: config.task={config.task!r}")
    loop.check_train_config(config.train)
    loop.check_data_config(config.data)
    lm_data.check_source(config.data)
    if config.task == "translate" and config.data.get("source", "tfds") != "tfds":
        raise ValueError(
            "`data.source` must be 'tfds' for config.task='translate' (token caches "
            f"hold language-modelling text). Received: data.source={config.data.source!r}"
        )
    check_model_config(config.model)
    _check_int("eval.beam_size", config.eval.beam_size, 1)
    _check_int("eval.bleu_examples", config.eval.bleu_examples, 0)
    _check_int("eval.decode_batch_size", config.eval.decode_batch_size, 1)
    if config.eval.length_penalty_alpha < 0:
        raise ValueError(
            "`eval.length_penalty_alpha` must be >= 0. Received: "
            f"eval.length_penalty_alpha={config.eval.length_penalty_alpha!r}"
        )


def corpus_name(config):
    return config.data.corpus or BUILT_IN_CORPORA[config.task]


def make_datasets(config):
    """`lm_data.LmData` of the run, and split_fn(name, **kwargs) -> a
    `tf.data` split (translation's BLEU reads it; None for "lm")."""
    corpus = corpus_name(config)
    if config.task == "lm":
        return lm_data.make(config, corpus, _BUILD_DATA.value), None
    from tf_moe.data import pipeline  # pylint: disable=g-import-not-at-top

    d = config.data
    tokenizer = lm_data.prepare_tfds_corpus(d, corpus, _BUILD_DATA.value, translation=True)

    def split(name, batch_size=config.train.batch_size, **kwargs):
        return pipeline.translation_dataset(
            corpus, name, d.sequence_length, batch_size, d.data_dir, tokenizer=tokenizer,
            seed=config.seed, source_language=d.source_language,
            target_language=d.target_language, **kwargs,
        )

    def make_train(start_step):
        return split("train", repeat=True, shuffle=True).skip(start_step)

    def evaluation(name):
        ds = split(name, batch_size=loop.eval_batch_size(config), shuffle=False)
        return ds.take(d.eval_batches) if d.eval_batches else ds

    data = lm_data.LmData(
        vocab_size=tokenizer.vocab_size,
        make_train=make_train,
        validation=evaluation("validation"),
        test=evaluation("test"),
        train_target_counts=None,  # no unigram baseline in this trainer
        tokenizer=tokenizer,
    )
    return data, split


def build_model(config, vocab_size):
    """The compiled model of `config.task`."""
    if config.task == "lm":
        model = build_decoder_lm(vocab_size, config.data.sequence_length, config.model)
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        perplexity = loop.Perplexity()
    else:
        from tf_moe.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

        model = build_encoder_decoder(
            vocab_size, config.data.sequence_length, config.model, pad_id=tokenizer_lib.PAD_ID
        )
        # Padding after EOS is no target: masked in the loss and perplexity.
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=tokenizer_lib.PAD_ID
        )
        perplexity = loop.Perplexity(ignore_id=tokenizer_lib.PAD_ID)
    model.compile(
        optimizer=loop.make_optimizer(config.train),
        loss=loss,
        metrics=[perplexity],
        jit_compile=loop.resolve_jit_compile(config.train.jit_compile),
    )
    return model


class Translator:
    """Greedy and beam-search translation with a `build_encoder_decoder` model.

    Encodes once per batch; every step re-runs the decoder up to its final
    LayerNorm on the whole prefix (one compiled function for all steps) and
    projects only position t to the vocabulary.
    """

    def __init__(self, model):
        self.encoder = model.get_layer("encoder")
        decoder = model.get_layer("decoder")
        self.decoder_states = keras.Model(
            decoder.inputs, decoder.get_layer("decoder_final_norm").output
        )
        self.logits = decoder.get_layer("logits")

    def translate(self, source, beam_size, alpha):
        """<int32>[B, S] numpy sources -> <int32>[B, L] numpy tokens (PAD
        after EOS); greedy search for beam_size 1, else beam search."""
        batch, length = source.shape
        memory = self.encoder.predict_on_batch(source)  # [B, S, d]
        if beam_size > 1:
            # Row b * K + k of the beam batch belongs to example b.
            memory = np.repeat(memory, beam_size, axis=0)  # [B * K, S, d]
            source = np.repeat(source, beam_size, axis=0)  # [B * K, S]

        def logits_fn(prefix, t):
            states = self.decoder_states.predict_on_batch([memory, source, prefix])  # [N, L, d]
            return self.logits(states[:, t])  # [N, V]

        from tf_moe.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

        ids = dict(bos_id=tokenizer_lib.BOS_ID, eos_id=tokenizer_lib.EOS_ID, pad_id=tokenizer_lib.PAD_ID)
        if beam_size == 1:
            tokens = decoding.greedy_search(logits_fn, batch, length, **ids)
        else:
            tokens, _ = decoding.beam_search(logits_fn, batch, length, beam_size, alpha, **ids)
        return ops.convert_to_numpy(tokens)


def bleu(translator, config, tokenizer, split_fn, split, beam_size):
    """sacrebleu corpus BLEU of the first `eval.bleu_examples` sentences of
    `split` (0: all), against the raw (untokenized) reference sentences.

    Sources longer than `data.sequence_length` tokens are cut, as in training.
    Batches have a fixed size (the last is padded with empty sources), so the
    decoder compiles once per beam size.
    """
    # pylint: disable-next=g-import-not-at-top
    import sacrebleu
    import tensorflow_datasets as tfds

    e, d = config.eval, config.data
    raw = tfds.load(corpus_name(config), split=split, data_dir=d.data_dir, shuffle_files=False)
    limit = e.bleu_examples or None
    references = [
        text.decode("utf-8")
        for text in raw.map(lambda x: x[d.target_language]).take(limit or -1).as_numpy_iterator()
    ]
    batches = split_fn(split, batch_size=e.decode_batch_size, shuffle=False, drop_remainder=False)
    hypotheses = []
    for features, _ in batches.as_numpy_iterator():
        if len(hypotheses) >= len(references):
            break
        source = features["source"]
        count = len(source)
        source = np.pad(source, [(0, e.decode_batch_size - count), (0, 0)])
        tokens = translator.translate(source, beam_size, e.length_penalty_alpha)[:count]
        hypotheses += [t.decode("utf-8") for t in tokenizer.detokenize(tokens).numpy()]
    hypotheses = hypotheses[: len(references)]
    return sacrebleu.corpus_bleu(hypotheses, [references]).score, hypotheses[:3]


def main(argv):
    del argv
    config = _CONFIG.value
    with loop.config_errors():
        loop.check_workdir(_WORKDIR.value)
        check_config(config)
        loop.set_dtype_policy(config.train)
        scope, where = distribution.setup(config)
    keras.utils.set_random_seed(config.seed)
    data, split_fn = make_datasets(config)
    tokenizer = data.tokenizer
    with scope, loop.config_errors():  # the layers check the model fields
        model = build_model(config, data.vocab_size)
    # LM: every position is a token; translate: padded target positions.
    tokens_per_step = config.train.batch_size * config.data.sequence_length
    result = loop.fit(model, data.make_train, config, _WORKDIR.value, tokens_per_step)
    total, active = loop.parameter_counts(model)
    summary = {
        "backend": keras.backend.backend(),
        **where,
        "task": config.task,
        "corpus": corpus_name(config),
        "steps": result["final_step"],
        "resumed_from_step": result["start_step"],
        "data_source": config.data.get("source", "tfds"),
        "validation_perplexity": loop.evaluate(model, data.validation)["perplexity"],
        "test_perplexity": loop.evaluate(model, data.test)["perplexity"],
    }
    if config.task == "translate":
        start = time.perf_counter()
        translator = Translator(model)
        for split in ("validation", "test"):
            for name, beam_size in (("greedy", 1), ("beam", config.eval.beam_size)):
                score, samples = bleu(translator, config, tokenizer, split_fn, split, beam_size)
                summary[f"{split}_bleu_{name}"] = score
                print(f"{split} {name} samples: {samples}", flush=True)
        summary["beam_size"] = config.eval.beam_size
        summary["bleu_seconds"] = time.perf_counter() - start
    summary.update({
        "total_parameters": total,
        "active_parameters_per_token": active,
        "train_tokens_per_sec": result["tokens_per_sec"],
    })
    loop.write_summary(_WORKDIR.value, summary)


if __name__ == "__main__":
    app.run(loop.run_main(main))
