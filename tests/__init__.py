"""The test suite, by kind: unit/ (pure functions and small jits), e2e/ (jobs end to end: the RL loop,
pretraining, analyses, the grid, the entry point, several processes, the notebook, launch scripts),
parity/ (against PyTorch / transformers / diffusers references). Shared builders: tests/fixtures.py."""
