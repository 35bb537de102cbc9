"""End-to-end tests: whole jobs (RL loop, pretraining, analyses, grid, entry point, several processes, notebook, launch scripts)."""
