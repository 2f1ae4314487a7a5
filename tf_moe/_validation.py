"""Argument validation shared by layers, routers and trainers: every error
names the argument (or config field), the allowed values and what was
received."""

import math


def _is_number(value):
    return not isinstance(value, bool) and isinstance(value, (int, float))


def check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )


def check_non_negative(name, value):
    """A finite number >= 0 (a loss weight, a noise level)."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value!r}"
        )


def check_positive(name, value):
    """A finite number > 0 (a learning rate)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0. Received: {name}={value!r}"
        )


def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(
            f"`{name}` must be one of {tuple(allowed)}. Received: {name}={value!r}"
        )


def check_k(k, num_experts, k_name="k", experts_name="num_experts"):
    """Validates the number of choices per token against the expert count
    (under the caller's argument names)."""
    check_positive_int(k_name, k)
    if num_experts is not None and k > num_experts:
        raise ValueError(
            f"`{k_name}` must be at most `{experts_name}`. "
            f"Received: {k_name}={k}, {experts_name}={num_experts}"
        )


def check_capacity_factor(name, value):
    if value is None:
        return
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0, or None for no token dropping. "
            f"Received: {name}={value!r}"
        )


def check_fraction(name, value):
    """A probability such as a dropout rate: a number in [0, 1)."""
    if not _is_number(value) or not 0 <= value < 1:  # NaN fails the comparison
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")


def check_initializer(name, value):
    """A Keras initializer (object, name or config) or None; returns it
    resolved (None stays None)."""
    import keras

    if value is None:
        return None
    try:
        return keras.initializers.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"`{name}` must be a Keras initializer (an instance, a name such as "
            f"'glorot_uniform', or its config), or None. Received: {name}={value!r}"
        ) from error
