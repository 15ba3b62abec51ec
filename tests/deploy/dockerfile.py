"""A small Dockerfile reader: stages, instructions and each target's resolved image config.

Only what the recipe tests need: line continuations, comments, global and stage ARGs,
``FROM ... AS name``, exec-form (JSON) and shell-form commands, ``ENV k=v`` pairs and
``HEALTHCHECK [options] CMD ...``. Inheritance follows ``FROM <stage>`` the way Docker
does (a child's ENTRYPOINT resets the parent's CMD).
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def flags_and_args(self) -> tuple[dict[str, str], str]:
        """Leading ``--flag=value`` options and the rest, e.g. COPY --from=x a b."""
        flags: dict[str, str] = {}
        rest = self.value
        while True:
            m = re.match(r"--([\w-]+)(?:=(\S+))?\s+", rest)
            if not m:
                return flags, rest
            flags[m.group(1)] = m.group(2) or ""
            rest = rest[m.end() :]

    def copy_parts(self) -> tuple[str | None, list[str], str]:
        """COPY/ADD: (``--from`` stage or None, sources, destination)."""
        flags, rest = self.flags_and_args()
        words = parse_command(rest) if rest.strip().startswith("[") else rest.split()
        return flags.get("from"), words[:-1], words[-1]


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


@dataclass
class ImageConfig:
    env: dict[str, str]
    workdir: str | None
    user: str | None
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str] | None
    healthcheck_options: dict[str, str]
    expose: list[str]
    stopsignal: str | None


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(name)

    @property
    def default_target(self) -> Stage:
        return self.stages[-1]

    def chain(self, name: str) -> list[Stage]:
        """The stage and its ancestors that are stages of this file, base first."""
        names = {s.name for s in self.stages}
        out = [self.stage(name)]
        while out[0].base in names:
            out.insert(0, self.stage(out[0].base))
        return out

    def external_base(self, name: str) -> str:
        return self.expand(self.chain(name)[0].base)

    def expand(self, text: str) -> str:
        return expand(text, self.global_args)

    def config(self, name: str) -> ImageConfig:
        cfg = ImageConfig({}, None, None, [], [], None, {}, [], None)
        for stage in self.chain(name):
            args = dict(self.global_args)
            for ins in stage.instructions:
                if ins.keyword == "ARG":
                    key, _, default = ins.value.partition("=")
                    args[key.strip()] = default.strip()
                elif ins.keyword == "ENV":
                    for key, value in parse_env(ins.value).items():
                        cfg.env[key] = expand(value, {**args, **cfg.env})
                elif ins.keyword == "WORKDIR":
                    cfg.workdir = ins.value.strip()
                elif ins.keyword == "USER":
                    cfg.user = ins.value.strip()
                elif ins.keyword == "ENTRYPOINT":
                    cfg.entrypoint = parse_command(ins.value)
                    if not any(i.keyword == "CMD" for i in stage.instructions):
                        cfg.cmd = []
                elif ins.keyword == "CMD":
                    cfg.cmd = parse_command(ins.value)
                elif ins.keyword == "HEALTHCHECK":
                    cfg.healthcheck, cfg.healthcheck_options = parse_healthcheck(ins.value)
                elif ins.keyword == "EXPOSE":
                    cfg.expose.extend(ins.value.split())
                elif ins.keyword == "STOPSIGNAL":
                    cfg.stopsignal = ins.value.strip()
        return cfg


def expand(text: str, variables: dict[str, str]) -> str:
    """``$VAR`` and ``${VAR}`` from ``variables``; unknown ones are left as written."""

    def repl(m: re.Match[str]) -> str:
        key = m.group(1) or m.group(2)
        return variables.get(key, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def parse_env(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in shlex.split(value):
        key, sep, val = token.partition("=")
        if not sep:
            raise ValueError(f"ENV without '=': {value!r} (use the key=value form)")
        out[key] = val
    return out


def parse_command(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list) and all(isinstance(p, str) for p in parsed)
        return parsed
    return ["/bin/sh", "-c", value]


def parse_healthcheck(value: str) -> tuple[list[str] | None, dict[str, str]]:
    options: dict[str, str] = {}
    rest = value.strip()
    while rest.startswith("--"):
        opt, _, rest = rest.partition(" ")
        key, _, val = opt[2:].partition("=")
        options[key] = val
        rest = rest.strip()
    if rest.upper() == "NONE":
        return None, options
    keyword, _, command = rest.partition(" ")
    if keyword.upper() != "CMD":
        raise ValueError(f"HEALTHCHECK must be NONE or CMD ...: {value!r}")
    return parse_command(command), options


def parse(path: Path) -> Dockerfile:
    logical: list[tuple[int, str]] = []
    buf = ""
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction
        if not buf:
            start = number
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        logical.append((start, buf))
        buf = ""
    if buf:
        raise ValueError(f"{path}: dangling line continuation at line {start}")

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, text in logical:
        keyword, _, value = text.partition(" ")
        keyword = keyword.upper()
        value = value.strip()
        if keyword == "FROM":
            words = [w for w in value.split() if not w.startswith("--")]
            base = words[0]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
        elif not stages:
            if keyword != "ARG":
                raise ValueError(f"{path}:{number}: only ARG may precede the first FROM")
            key, _, default = value.partition("=")
            global_args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append(Instruction(keyword, value, number))
    return Dockerfile(global_args, stages)
