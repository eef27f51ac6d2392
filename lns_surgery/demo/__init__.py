"""The offline end-to-end demo and its built-in base model."""
