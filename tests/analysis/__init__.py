"""The analyses' tests: tails, concentration, layers, comparison, metrics."""
