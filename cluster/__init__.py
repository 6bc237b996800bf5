"""raylm: cluster."""
