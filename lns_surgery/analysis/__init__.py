"""Depth diagnostics: layer-removal drop, angular distance and per-layer variance."""
