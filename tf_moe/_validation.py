"""Argument validation shared by layers and routers: every error names the
argument, the allowed values and what was received."""


def check_positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}"
        )


def check_non_negative(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")


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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(
            f"`{name}` must be a number > 0, or None for no token dropping. "
            f"Received: {name}={value!r}"
        )


def check_fraction(name, value):
    """A probability such as a dropout rate: a number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"`{name}` must be a number in [0, 1). Received: {name}={value!r}")
