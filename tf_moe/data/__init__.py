"""Data for the tf_moe trainers: built-in corpora, tokenizers, input pipelines.

Importing this package registers the tfds builders `tf_moe_lm_en` and
`tf_moe_translate_en_de` (see `builders`). See docs/data.md.
"""

from tf_moe.data import builders
from tf_moe.data.builders import TfMoeLmEn, TfMoeTranslateEnDe
from tf_moe.data.pipeline import lm_dataset, translation_dataset
from tf_moe.data.tokenizer import Tokenizer, load_or_train as load_tokenizer
