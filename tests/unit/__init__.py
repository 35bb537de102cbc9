"""Unit tests: pure functions and small jits against hand computations."""
