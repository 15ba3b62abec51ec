"""Model backends: one small interface (``infer``, ``aclose``), concurrency by wrappers."""
