"""The equal-compute sweep of Shazeer et al. 2017, table 1 / table 7, on one GPU.

Every model: embedding, LSTM-512, a 512-wide FFN block, LSTM-512, softmax
(d = 512 and expert hidden 1024 as in the paper). The FFN block is

    dense       one ReLU FFN of hidden 4096: every token runs all of it
                (the paper's MoE-1-Wide), the compute-matched baseline
    dense_wide  hidden 16384: four times the FFN compute
    moe<E>      a flat noisy top-4 MoE of E experts of hidden 1024
    moe<E>h     hierarchical: sqrt(E) groups of sqrt(E) experts, top-2 of
                each gate (2 x 2 = 4 experts per token)

so the MoE models and `dense` run the same ops per timestep (about 8.4M
multiply-adds without the softmax; experiments/lstm_moe_sweep.py counts
them) while their parameters grow with E. Data: the built-in corpus as a
token cache (`data.source=token_cache`), 64-token windows, 256 per batch.

    python -m trainers.lstm_moe --config=configs/lstm_moe_sweep.py:moe64 \
        --config.data.token_cache_dir=/data/lm_cache --workdir=...
"""

from configs import lstm_moe_tiny

FLAT = (4, 16, 64, 256)
HIERARCHICAL = {"moe256h": (16, 16), "moe1024h": (32, 32)}
DENSE = {"dense": 4096, "dense_wide": 16384}
NAMES = tuple(DENSE) + tuple(f"moe{e}" for e in FLAT) + tuple(HIERARCHICAL)


def get_config(name="moe64"):
    if name not in NAMES:
        raise ValueError(f"lstm_moe_sweep takes a name in {NAMES}. Received: name={name!r}")
    config = lstm_moe_tiny.get_config()
    d = config.data
    d.source = "token_cache"
    d.sequence_length = 64
    d.eval_batches = 0  # the whole validation and test splits
    # Evaluation routes dropless; without the custom-call library the
    # capacity paths hold every expert's buffer at a full group's capacity
    # (T x E x h floats), so evaluate 32 sequences at a time.
    d.eval_batch_size = 32
    m = config.model
    m.dim = 512
    m.expert_hidden_dim = 1024
    m.dropout = 0.1
    m.k = 4
    m.group_size = 4096
    if name in DENSE:
        m.dense_ffn_hidden_dim = DENSE[name]
    elif name in HIERARCHICAL:
        m.hierarchical = True
        m.num_groups, m.experts_per_group = HIERARCHICAL[name]
        m.primary_k, m.secondary_k = 2, 2
    else:
        m.num_experts = int(name[len("moe"):])
    t = config.train
    t.batch_size = 256
    t.steps = 2000
    t.checkpoint_every = 500
    t.keep_checkpoints = 1
    t.learning_rate = 1e-3
    t.warmup_steps = 200
    t.log_every = 100
    return config
