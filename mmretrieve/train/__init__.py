"""Contrastive fine-tuning: data pipeline, trainable-parameter strategies, losses, the loop."""
