"""raylm: serving."""
