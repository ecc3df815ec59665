"""Offline workflows: labeled data and residual caches, discovery, calibration, evaluation, baselines,
steering evaluation and SAE training."""
