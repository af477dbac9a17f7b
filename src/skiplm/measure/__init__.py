"""Measuring against the full model: perplexity, speed, generation agreement, and the cost and latency models."""
