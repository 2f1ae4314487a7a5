"""Data for the tf_moe trainers: built-in corpora, tokenizers, input pipelines.

Importing this package registers the tfds builders `tf_moe_lm_en`,
`tf_moe_lm_en_large` and `tf_moe_translate_en_de` (see `builders`). See docs/data.md.

Where TensorFlow is not installed (a JAX-only machine) the TensorFlow parts
are skipped, so that `tf_moe.data.token_cache` (token caches read with
Grain) imports; their names then raise an ImportError saying so.
"""

_TENSORFLOW_MODULES = ("tensorflow", "tensorflow_datasets", "tensorflow_text")

try:
    from tf_moe.data import builders
    from tf_moe.data.builders import TfMoeLmEn, TfMoeLmEnLarge, TfMoeTranslateEnDe
    from tf_moe.data.pipeline import lm_dataset, translation_dataset
    from tf_moe.data.tokenizer import Tokenizer, load_or_train as load_tokenizer
except ModuleNotFoundError as error:
    # Only a missing TensorFlow is tolerated; any other missing module is a
    # broken install and is raised as usual.
    if (error.name or "").split(".")[0] not in _TENSORFLOW_MODULES:
        raise
    _missing_tensorflow = error

    def __getattr__(name):
        if name in (
            "builders", "TfMoeLmEn", "TfMoeLmEnLarge", "TfMoeTranslateEnDe", "lm_dataset",
            "translation_dataset", "Tokenizer", "load_tokenizer",
        ):
            raise ImportError(
                f"tf_moe.data.{name} needs TensorFlow ({_missing_tensorflow}). "
                "Without TensorFlow, read an exported token cache with "
                "tf_moe.data.token_cache (see docs/data.md)."
            ) from _missing_tensorflow
        raise AttributeError(f"module 'tf_moe.data' has no attribute {name!r}")
