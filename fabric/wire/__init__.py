"""What crosses processes: the leaf package every layer may import.

- ``gcwire``: Globus Compute task/result messages and the fabric's ok/error envelopes;
- ``framing``: length-prefixed frame lists on the local site's Unix socket;
- ``arrays``: numpy arrays (tensors) as ``{"dtype", "shape", "data"}`` maps;
- ``functions``: named references to the fabric's endpoint functions (shipped by reference).

It imports nothing from the fabric but ``fabric.errors`` (``tests/test_layering.py``).
"""
