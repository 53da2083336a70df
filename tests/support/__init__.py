"""Tiny random-weight models and the real models' fetchers, for tests and benchmarks (not shipped)."""
