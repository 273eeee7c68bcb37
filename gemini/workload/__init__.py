"""Models, synthetic data and the training loop."""
