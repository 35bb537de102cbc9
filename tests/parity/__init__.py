"""Parity tests: ng_jax against the PyTorch reference implementations (the test extra)."""
