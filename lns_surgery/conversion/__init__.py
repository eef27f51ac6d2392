"""Converting checkpoints: the architecture registry, detection, code and fold modes."""
