"""Training draft heads by self-distillation: data generation with cached features, the training loop, curves."""
