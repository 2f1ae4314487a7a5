"""absl-flag trainers for the LSTM-MoE and Transformer-MoE recipes."""
