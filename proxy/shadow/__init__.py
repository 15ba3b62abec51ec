"""The shadow worker: mirrored work in its own process, fed by the live path (docs/proxy.md)."""
