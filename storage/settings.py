"""Typed settings of the storage layer (the ``storage:`` section of the config file).

Defined here, not in ``proxy.core.config``, because ``storage`` never imports ``proxy``;
``proxy.core.config`` imports this class, as it does ``gates.settings``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StorageSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(
        "sqlite:///mirrorgate.sqlite",
        description="SQLAlchemy URL: sqlite:///PATH (relative to the working directory) "
        "or postgresql+psycopg://user:pass@host:port/db",
    )
    sqlite_journal: Literal["truncate", "wal"] = Field(
        "truncate",
        description="SQLite journal: truncate (rollback journal, no memory-mapped index: "
        "a damaged or full disk is an error, never a SIGBUS) or wal (faster readers)",
    )
    migrate: Literal["upgrade", "refuse"] = Field(
        "upgrade",
        description="at server start, when the schema is behind: upgrade it (under a lock "
        "on PostgreSQL) or refuse to start and ask for `mirrorgate db upgrade`",
    )
    capture: Literal["all", "failures", "never"] = Field(
        "failures",
        description="store input tensors for every pair, only for failures, or never (digest only)",
    )
    capture_cache_size: int = Field(
        10_000, ge=0, description="failures: recent pairs whose inputs are held in memory"
    )
    capture_cache_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="failures: memory bound of that cache"
    )
    batch_size: int = Field(500, ge=1, description="rows per bulk insert")
    flush_interval_ms: float = Field(200.0, gt=0, description="flush a partial batch after")
    buffer_size: int = Field(100_000, ge=1, description="records waiting for the database")
    retry_initial_ms: float = Field(50.0, gt=0, description="first retry delay when a write fails")
    retry_max_ms: float = Field(5_000.0, gt=0, description="retry delay cap (doubling backoff)")
    close_timeout_s: float = Field(
        10.0, ge=0, description="how long shutdown waits for the database to take the buffer"
    )
    retention_days: float | None = Field(None, gt=0, description="purge pairs older than this")
    retention_rows: int | None = Field(None, ge=1, description="keep at most this many pairs")
    purge_interval_s: float = Field(600.0, gt=0)
    label_window_s: float = Field(86_400.0, gt=0, description="how long labels wait for pairs")

    @model_validator(mode="after")
    def _check_retry(self) -> StorageSettings:
        if self.retry_max_ms < self.retry_initial_ms:
            raise ValueError("retry_max_ms must be >= retry_initial_ms")
        return self
