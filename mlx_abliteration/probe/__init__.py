"""Forward passes that capture the residual stream, writer discovery and the per-layer proof, directions."""
