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
        "absl-py",
        "numpy",
    ],
    extras_require={
        "test": ["jax[cpu]"],
        "jax": ["jax"],
    },
)
