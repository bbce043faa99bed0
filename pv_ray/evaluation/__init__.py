"""Evaluation: video metrics, base-vs-adapted clips on held-out prompts, store-wide reports."""
