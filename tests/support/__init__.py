"""Test helpers shared across areas (real services: PostgreSQL)."""
