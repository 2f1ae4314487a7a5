r"""Trains the LSTM-MoE language model (Shazeer et al. 2017) with absl flags.

    python -m trainers.lstm_moe --config=configs/lstm_moe_tiny.py \
        --workdir=/tmp/lstm_moe [--config.model.num_experts=32] [--tpu=NAME]

The backend comes from KERAS_BACKEND. A run resumes automatically from the
newest good checkpoint in --workdir. Prints validation and test perplexity next
to an add-one unigram baseline's, total vs active parameters per token, and
tokens/s; writes them to <workdir>/summary.json.
"""


import keras
import numpy as np
import tensorflow_datasets as tfds
from absl import app, flags
from ml_collections import config_flags

from tf_moe import data as data_lib
from tf_moe.data import pipeline
from tf_moe.data import tokenizer as tokenizer_lib
from tf_moe.models import build_lstm_moe
from tf_moe.models.lstm_moe import check_model_config
from trainers import distribution, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/lstm_moe_tiny.py", "Path to a config file (configs/*.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard, summary.")
_BUILD_DATA = flags.DEFINE_bool(
    "build_data", True, "Build the built-in corpus first if it is missing."
)
flags.mark_flag_as_required("workdir")


def make_datasets(config):
    """(tokenizer, make_train(start_step), validation, test) datasets."""
    d = config.data
    builder = loop.corpus_builder(d.corpus, d.data_dir)
    if _BUILD_DATA.value and d.corpus == data_lib.TfMoeLmEn.name:
        # Fetches and prepares the built-in corpus once; a no-op afterwards.
        builder.download_and_prepare()
    elif not builder.is_prepared():
        raise loop.ConfigError(
            f"`data.corpus` {d.corpus!r} is not prepared in `data.data_dir` "
            f"({builder.data_dir}): prepare it there with tfds (`tfds build "
            f"{d.corpus} --data_dir=...`) or point data.data_dir at it. Received: "
            f"data.data_dir={d.data_dir!r}"
        )
    tokenizer = tokenizer_lib.load_or_train(d.corpus, d.data_dir, d.vocab_size)
    batch = config.train.batch_size

    def split(name, **kwargs):
        return pipeline.lm_dataset(
            d.corpus, name, d.sequence_length, batch, d.data_dir,
            tokenizer=tokenizer, seed=config.seed, **kwargs,
        )

    def make_train(start_step):
        return split("train", repeat=True, shuffle=True).skip(start_step)

    def evaluation(name):
        ds = split(name, shuffle=False)
        return ds.take(d.eval_batches) if d.eval_batches else ds

    return tokenizer, make_train, evaluation("validation"), evaluation("test")


def unigram_baseline(config, tokenizer, test):
    """Add-one unigram perplexity: counts from the train split, scored on the
    same test targets the model is scored on."""
    counts = np.zeros(tokenizer.vocab_size, np.int64)
    train = pipeline.lm_dataset(
        config.data.corpus, "train", config.data.sequence_length, 256,
        config.data.data_dir, tokenizer=tokenizer, shuffle=False,
    )
    for _, targets in train.as_numpy_iterator():
        counts += np.bincount(targets.ravel(), minlength=tokenizer.vocab_size)
    test_tokens = np.concatenate([t.ravel() for _, t in test.as_numpy_iterator()])
    return loop.unigram_perplexity(counts, test_tokens)


def main(argv):
    del argv
    config = _CONFIG.value
    with loop.config_errors():
        loop.check_workdir(_WORKDIR.value)
        loop.check_train_config(config.train)
        loop.check_data_config(config.data)
        check_model_config(config.model)
        loop.set_dtype_policy(config.train)
        scope, where = distribution.setup(config)
    keras.utils.set_random_seed(config.seed)
    tokenizer, make_train, validation, test = make_datasets(config)
    with scope, loop.config_errors():  # the layers check the model fields
        model = build_lstm_moe(tokenizer.vocab_size, config.data.sequence_length, config.model)
        model.compile(
            optimizer=loop.make_optimizer(config.train),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[loop.Perplexity()],
            jit_compile=config.train.jit_compile,
        )
    tokens_per_step = config.train.batch_size * config.data.sequence_length
    result = loop.fit(model, make_train, config, _WORKDIR.value, tokens_per_step)
    total, active = loop.parameter_counts(model)
    summary = {
        "backend": keras.backend.backend(),
        **where,
        "steps": result["final_step"],
        "resumed_from_step": result["start_step"],
        "validation_perplexity": loop.evaluate(model, validation)["perplexity"],
        "test_perplexity": loop.evaluate(model, test)["perplexity"],
        "unigram_test_perplexity": unigram_baseline(config, tokenizer, test),
        "total_parameters": total,
        "active_parameters_per_token": active,
        "train_tokens_per_sec": result["tokens_per_sec"],
    }
    loop.write_summary(_WORKDIR.value, summary)


if __name__ == "__main__":
    app.run(loop.run_main(main))
