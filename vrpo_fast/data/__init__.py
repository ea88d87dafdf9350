"""Preference data: loading, validation, tokenization."""
