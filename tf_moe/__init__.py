"""tf_moe: sparsely-gated Mixture-of-Experts layers for Keras 3."""

from tf_moe import layers, metrics, models, ops, routing, sharding

__version__ = "0.1.0"
