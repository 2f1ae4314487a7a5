"""Routers: token -> expert assignment, as a `Routing` value."""

from tf_moe.routing import losses
from tf_moe.routing.capacity import apply_capacity, assign_positions
from tf_moe.routing.expert_choice import ExpertChoiceRouter, expert_choice_routing
from tf_moe.routing.noisy_top_k import (
    NoisyGates,
    NoisyTopKRouter,
    noisy_top_k_gates,
    noisy_top_k_routing,
)
from tf_moe.routing.router import Router, Routing, expert_capacity
from tf_moe.routing.top_k import TopKRouter, top_k_routing
