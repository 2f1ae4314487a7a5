r"""Trains the LSTM-MoE language model (Shazeer et al. 2017) with absl flags.

    python -m trainers.lstm_moe --config=configs/lstm_moe_tiny.py \
        --workdir=/tmp/lstm_moe [--config.model.num_experts=32] [--tpu=NAME]

The backend comes from KERAS_BACKEND. `--config.data.source=token_cache`
with `--config.data.token_cache_dir=DIR` reads an exported token cache
(`python -m tf_moe.data.token_cache`) without TensorFlow (JAX hosts; see
trainers/lm_data.py). A run resumes automatically from the
newest good checkpoint in --workdir. Prints validation and test perplexity next
to an add-one unigram baseline's, total vs active parameters per token, and
tokens/s; writes them to <workdir>/summary.json.
"""


import keras
from absl import app, flags
from ml_collections import config_flags

from tf_moe.models import build_lstm_moe
from tf_moe.models.lstm_moe import check_model_config
from trainers import distribution, lm_data, loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/lstm_moe_tiny.py", "Path to a config file (configs/*.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard, summary.")
_BUILD_DATA = flags.DEFINE_bool(
    "build_data", True, "Build the built-in corpus first if it is missing."
)
flags.mark_flag_as_required("workdir")


def main(argv):
    del argv
    config = _CONFIG.value
    with loop.config_errors():
        loop.check_workdir(_WORKDIR.value)
        loop.check_train_config(config.train)
        loop.check_data_config(config.data)
        lm_data.check_source(config.data)
        check_model_config(config.model)
        loop.set_dtype_policy(config.train)
        scope, where = distribution.setup(config)
    keras.utils.set_random_seed(config.seed)
    data = lm_data.make(config, config.data.corpus, _BUILD_DATA.value)
    with scope, loop.config_errors():  # the layers check the model fields
        model = build_lstm_moe(data.vocab_size, config.data.sequence_length, config.model)
        model.compile(
            optimizer=loop.make_optimizer(config.train),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=[loop.Perplexity()],
            jit_compile=loop.resolve_jit_compile(config.train.jit_compile),
        )
    tokens_per_step = config.train.batch_size * config.data.sequence_length
    result = loop.fit(model, data.make_train, config, _WORKDIR.value, tokens_per_step)
    total, active = loop.parameter_counts(model)
    test = loop.evaluate(model, data.test)
    summary = {
        "backend": keras.backend.backend(),
        **where,
        "steps": result["final_step"],
        "resumed_from_step": result["start_step"],
        "data_source": config.data.get("source", "tfds"),
        "validation_perplexity": loop.evaluate(model, data.validation)["perplexity"],
        "test_perplexity": test["perplexity"],
        "unigram_test_perplexity": lm_data.unigram_perplexity(data),
        "total_parameters": total,
        "active_parameters_per_token": active,
        "train_tokens_per_sec": result["tokens_per_sec"],
        # Routing health: the last training batch's (capacity drops) and the
        # last test batch's statistics of every MoE layer.
        "train_routing": loop.routing_logs(result["history"]),
        "test_routing": loop.routing_logs(test),
    }
    loop.write_summary(_WORKDIR.value, summary)


if __name__ == "__main__":
    app.run(loop.run_main(main))
