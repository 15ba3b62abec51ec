"""The validation pack: the report document, its rendering, its digest and sign-offs."""

from proxy.report.build import Pack, render_html, write_pack
from proxy.report.document import (
    SCHEMA_VERSION,
    canonical_json,
    load_document,
    load_schema,
    report_digest,
    validate_document,
)
from proxy.report.signoff import SignOff, SignoffCheck, check_all, check_signoff

__all__ = [
    "SCHEMA_VERSION",
    "Pack",
    "SignOff",
    "SignoffCheck",
    "canonical_json",
    "check_all",
    "check_signoff",
    "load_document",
    "load_schema",
    "render_html",
    "report_digest",
    "validate_document",
    "write_pack",
]
