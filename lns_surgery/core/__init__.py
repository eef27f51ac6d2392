"""What every stage shares: errors, names of models, checkpoint folders, outputs, LNS status, report text.

The layering (checked by tests/test_layering.py): ``modeling`` imports nothing else from the package
(``lns_layers.py`` ships inside checkpoints); ``core`` imports only ``core`` and ``modeling``; a stage
(conversion, training, analysis, publish, demo) uses ``core``, ``modeling`` and the names the other
stages export from their package ``__init__``, never another stage's modules.

Import the modules themselves (``from lns_surgery.core.errors import LNSError``): nothing is
imported here, so the CLI's start-up stays light.
"""
