"""raylm: training."""
