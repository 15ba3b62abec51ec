"""Settings and shared plumbing every layer may use; imports nothing else of proxy."""
