"""Integrations with other tools: the `skiplm` model type of lm-evaluation-harness."""
