"""Keras layers: experts, the MoE layer, the hierarchical MoE layer."""

from tf_moe.layers.experts import EXPERT_ACTIVATIONS, Experts
from tf_moe.layers.moe import MoE
from tf_moe.layers.hierarchical import HierarchicalMoE
