"""Reference models built from tf_moe layers."""

from tf_moe.models.lstm_moe import build_lstm_moe, moe_layer_from_config
from tf_moe.models.transformer_moe import build_decoder_lm, build_encoder_decoder
