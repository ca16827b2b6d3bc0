"""molre: Mixture of Low-Rank Experts fine-tuning of foundation models on head CT, on Ray."""

__version__ = "0.1.0"
