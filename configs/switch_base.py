"""Switch-Base (Fedus et al. 2021, "Switch Transformers"): a T5-Base-sized
encoder-decoder whose every other FFN is a top-1 (Switch) MoE; 128 experts.

Architecture numbers are those of the released Switch-Base checkpoints
(google/switch-base-128 config: d_model 768, d_ff 3072, 12 heads of 64,
12 encoder + 12 decoder layers, sparse every 2nd layer, ReLU, dropout 0.1,
router jitter 0.01, 32k SentencePiece vocabulary). From the paper: top-1
routing, balance loss alpha = 1e-2, capacity factor 1.25 in training (1.0 and
1.25 compared in its Table 1) and 2.0 at evaluation, router in float32,
"smaller parameter initialization" (scale 0.1, our TopKRouter's default), expert
dropout 0.4 when fine-tuning (0.1 here, as in pre-training). The paper reports
Switch-Base (128 experts) at about 7B parameters with T5-Base's FLOPs per token
and pre-trains it on C4 with span corruption; this config trains it on the
built-in translation corpus (or `--config.task=lm`) instead. Positions here are
learned absolute embeddings, not T5's relative buckets.

Not run here (paper-sized): the tests do a 2-step smoke run with tiny
overrides. Needs accelerators: `--tpu=NAME` (TF) or JAX on a TPU VM / GPUs.
"""

from configs import transformer_moe_base


def get_config():
    config = transformer_moe_base.paper_scale(transformer_moe_base.get_config())
    config.model.update(
        dim=768, num_heads=12, num_layers=12, ffn_hidden_dim=3072,
        num_experts=128, k=1, second_expert_policy="all", normalize_weights=False,
        jitter_noise=0.01, expert_hidden_dim=3072,
        capacity_factor=1.25, group_size=4096,
    )
    return config
