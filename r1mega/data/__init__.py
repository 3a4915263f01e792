"""Datasets, tokenizers and synthetic verifiable tasks."""
