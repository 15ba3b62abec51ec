"""The live HTTP path: forwarding, mirror dispatch, slicing, limits, auth, per-model stats."""
