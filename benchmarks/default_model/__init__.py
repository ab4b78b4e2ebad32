"""Training, decoding and evaluation code for the shipped default model (maskkv_engine/assets/default_model)."""
