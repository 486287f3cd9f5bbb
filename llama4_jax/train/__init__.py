"""Training: losses, optimizer, the pure train step."""
