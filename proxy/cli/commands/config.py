"""``mirrorgate config schema|defaults|reference|validate FILE``: the configuration model.

``schema`` prints the JSON Schema of the config file, ``defaults`` every default as YAML
(required keys shown as null), ``reference`` the Markdown reference that
docs/config-reference.md holds, ``validate FILE`` loads FILE with the environment's
overrides and runs the pre-start checks of ``serve`` (model files, URLs, database URL):
exit 0 when valid, 2 with every problem listed otherwise.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print the config schema, defaults or reference; validate a config file",
        description="Inspect the configuration model and check config files.",
    )
    sub = parser.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    schema = sub.add_parser("schema", help="print the JSON Schema of the config file")
    schema.set_defaults(func=run_schema)
    defaults = sub.add_parser("defaults", help="print every default as YAML")
    defaults.set_defaults(func=run_defaults)
    reference = sub.add_parser(
        "reference", help="print the Markdown config reference (docs/config-reference.md)"
    )
    reference.set_defaults(func=run_reference)
    validate = sub.add_parser(
        "validate",
        help="check a config file (with MIRRORGATE_ overrides) and what it points to",
    )
    validate.add_argument("file", metavar="FILE", help="YAML config file to check")
    validate.set_defaults(func=run_validate)


def run_schema(args: argparse.Namespace) -> int:
    from proxy.core.config import MirrorgateConfig

    print(json.dumps(MirrorgateConfig.model_json_schema(), indent=2))
    return 0


def run_defaults(args: argparse.Namespace) -> int:
    import yaml

    from proxy.cli.config_reference import defaults
    from proxy.core.config import MirrorgateConfig

    print(yaml.safe_dump(defaults(MirrorgateConfig), sort_keys=False), end="")
    return 0


def run_reference(args: argparse.Namespace) -> int:
    from proxy.cli.config_reference import markdown
    from proxy.core.config import MirrorgateConfig

    print(markdown(MirrorgateConfig), end="")
    return 0


def run_validate(args: argparse.Namespace) -> int:
    from proxy.cli.preflight import check
    from proxy.core.config import load_config

    config = load_config(args.file)
    check(config, args.file)
    print(f"{args.file}: valid (digest {config.digest()[:12]})")
    return 0
