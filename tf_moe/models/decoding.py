"""Greedy and beam-search decoding for autoregressive models, in keras.ops.

Both searches take `logits_fn(prefix, t) -> logits`, where `prefix` is
<int32>[N, L]: BOS at position 0, the tokens chosen so far at 1..t, padding
after; and logits [N, V] are the next-token scores after prefix[:, :t+1]
(for a causal decoder: its output at position t). The intended use re-runs
the decoder on the whole fixed-length prefix at every step (no key/value
cache): O(L^2) decoder work per sequence, fine at these model sizes, and
static-shaped, so one compiled decoder serves every step.

Beam search keeps `beam_size` alive hypotheses and `beam_size` finished ones
(ended by EOS) per example, as in Wu et al. 2016 and T5/flax. A finished
hypothesis Y of |Y| tokens (EOS included) scores
    log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6)^alpha
(Wu et al. 2016, eq. 14, without the coverage penalty); alpha = 0 ranks by
log-probability. Every step extends each alive hypothesis by every token,
keeps the 2K best extensions (so that K of them are not EOS), moves those
ending in EOS to the finished set and keeps the K best others alive. It runs
max_length steps; an example with no finished hypothesis returns its best
alive one.

Shape letters: B batch, K beam size, L max length, V vocabulary.
"""

from keras import ops

from tf_moe._validation import check_non_negative, check_positive_int

# A log-probability for "no hypothesis": far below any real one, finite so
# that sums stay finite.
_NEG = -1.0e9


def length_penalty(length, alpha):
    """lp = ((5 + length) / 6)^alpha (Wu et al. 2016)."""
    return ((5.0 + length) / 6.0) ** alpha


def _check(max_length, beam_size=1, alpha=0.0):
    check_positive_int("max_length", max_length)
    check_positive_int("beam_size", beam_size)
    check_non_negative("alpha", alpha)


def _set_column(tokens, column, values):
    """tokens [..., L] with tokens[..., column] = values [...]."""
    length = tokens.shape[-1]
    is_column = ops.arange(length) == column  # [L]
    return ops.where(is_column, ops.expand_dims(values, -1), tokens)


def greedy_search(logits_fn, batch_size, max_length, bos_id=2, eos_id=3, pad_id=0):
    """Picks the most likely next token at every step.

    Args:
        logits_fn: (prefix <int32>[B, L], t) -> logits [B, V] (see module doc).
        batch_size: int, B.
        max_length: int >= 1, L: generated tokens at most.
        bos_id, eos_id, pad_id: special token ids.

    Returns:
        <int32>[B, L] generated tokens; `pad_id` after the first EOS.
    """
    _check(max_length)
    # Shape: [B, L + 1]; column 0 is BOS, column t + 1 the token of step t.
    tokens = ops.full((batch_size, max_length + 1), pad_id, dtype="int32")
    tokens = _set_column(tokens, 0, ops.full((batch_size,), bos_id, dtype="int32"))
    done = ops.zeros((batch_size,), dtype="bool")  # [B]
    for t in range(max_length):
        logits = ops.convert_to_tensor(logits_fn(tokens[:, :max_length], t))  # [B, V]
        next_token = ops.cast(ops.argmax(logits, axis=-1), "int32")  # [B]
        next_token = ops.where(done, pad_id, next_token)
        tokens = _set_column(tokens, t + 1, next_token)
        done = ops.logical_or(done, next_token == eos_id)
    return tokens[:, 1:]


def _gather_beams(values, indices):
    """values [B, N, ...], indices <int>[B, M] -> [B, M, ...]."""
    index = ops.reshape(indices, tuple(indices.shape) + (1,) * (len(values.shape) - 2))
    return ops.take_along_axis(values, index, axis=1)


def beam_search(logits_fn, batch_size, max_length, beam_size, alpha=0.6,
                bos_id=2, eos_id=3, pad_id=0):
    """Length-normalized beam search (see the module docstring for the score).

    Args:
        logits_fn: (prefix <int32>[B * K, L], t) -> logits [B * K, V]; row
            b * K + k is beam k of example b (repeat per-example inputs such
            as encoder outputs with `ops.repeat(x, K, axis=0)`).
        batch_size: int, B.
        max_length: int >= 1, L: generated tokens at most.
        beam_size: int >= 1, K.
        alpha: float >= 0, length-penalty exponent (0.6 in Wu et al. and T5).
        bos_id, eos_id, pad_id: special token ids.

    Returns:
        (tokens <int32>[B, L]: the best hypothesis, `pad_id` after its EOS;
         scores <float32>[B]: its log P / lp).
    """
    _check(max_length, beam_size, alpha)
    b, k, n = batch_size, beam_size, max_length
    # Shape: [B, K, L + 1]; column 0 BOS, column t + 1 the token of step t.
    alive = ops.full((b, k, n + 1), pad_id, dtype="int32")
    alive = _set_column(alive, 0, ops.full((b, k), bos_id, dtype="int32"))
    # Only beam 0 is live at the start (the others are copies of it).
    alive_logp = ops.where(ops.arange(k) == 0, 0.0, _NEG) * ops.ones((b, 1))  # [B, K]
    finished = alive
    finished_score = ops.full((b, k), _NEG)  # [B, K]
    for t in range(n):
        logits = ops.convert_to_tensor(logits_fn(ops.reshape(alive[:, :, :n], (b * k, n)), t))
        logp = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)  # [B * K, V]
        vocab = logp.shape[-1]
        # Shape: [B, K * V], candidate (beam, token) pairs.
        candidate_logp = ops.reshape(alive_logp[:, :, None] + ops.reshape(logp, (b, k, vocab)), (b, k * vocab))
        top_logp, top_index = ops.top_k(candidate_logp, min(2 * k, k * vocab))  # [B, 2K]
        token = ops.cast(top_index % vocab, "int32")  # [B, 2K]
        sequences = _set_column(_gather_beams(alive, top_index // vocab), t + 1, token)  # [B, 2K, L+1]
        is_eos = token == eos_id
        real = top_logp > _NEG / 2  # extensions of live beams only

        # The K best extensions that did not end: the new alive set.
        alive_logp, keep = ops.top_k(ops.where(is_eos, _NEG, top_logp), k)  # [B, K]
        alive = _gather_beams(sequences, keep)

        # Merge the extensions that ended with the finished set; keep K.
        new_score = ops.where(ops.logical_and(is_eos, real), top_logp / length_penalty(t + 1, alpha), _NEG)
        merged_score = ops.concatenate([finished_score, new_score], axis=1)  # [B, 3K]
        merged = ops.concatenate([finished, sequences], axis=1)  # [B, 3K, L+1]
        finished_score, keep = ops.top_k(merged_score, k)  # [B, K]
        finished = _gather_beams(merged, keep)

    has_finished = finished_score[:, 0] > _NEG / 2  # [B]
    alive_score = alive_logp[:, 0] / length_penalty(n, alpha)  # [B]
    tokens = ops.where(has_finished[:, None], finished[:, 0, 1:], alive[:, 0, 1:])  # [B, L]
    scores = ops.where(has_finished, finished_score[:, 0], alive_score)
    return tokens, scores
