"""Public offline test helpers (like ``globus_sdk.testing``): tiny models built on the spot."""
