"""tf_moe: Keras 3 Mixture-of-Experts layers."""

from setuptools import find_packages, setup

setup(
    name="tf_moe",
    version="0.1.0",
    description="Keras 3 Mixture-of-Experts layers (TensorFlow and JAX backends).",
    packages=find_packages(include=["tf_moe", "tf_moe.*"]),
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.15,<4",
        "tensorflow-text==2.21.*",
        "tensorflow-datasets",
        # tensorflow-datasets 4.9.x imports it on every Python but declares it
        # only for Python < 3.9.
        "importlib_resources",
        # SentencePiece trainer for the tf_moe.data tokenizers.
        "sentencepiece",
        "absl-py",
        "numpy",
        # Trainers: TensorBoard summaries (tf 2.21 no longer pulls it in),
        # --config files and overrides, BLEU.
        "tensorboard",
        "ml-collections",
        "sacrebleu",
        # Trainer checkpoints (sharded, resharding on restore, atomic saves).
        "orbax-checkpoint",
        # JAX-side LM loader of token caches (tf_moe.data.token_cache), no TensorFlow needed.
        "grain>=0.2.18,<0.3",
    ],
    extras_require={
        "test": ["jax[cpu]"],
        "jax": ["jax"],
    },
)
