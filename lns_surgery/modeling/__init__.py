"""The LNS model classes: ``lns_layers.py`` ships inside every checkpoint; ``auto.py`` builds the same
classes inside this process and registers them with transformers' Auto classes."""
