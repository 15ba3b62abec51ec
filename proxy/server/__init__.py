"""The composition root: assembles data plane, control plane and backends into the app."""
