"""Fixtures for tests and examples: tiny models of every family, built from the real libraries."""
