"""Replays the Dockerfile's recipe on this machine, without a Docker engine.

The image's file system becomes a temporary folder: COPY lines copy from the repository
into it, the build stage's install.sh RUN runs with the stage's ARG/ENV, and the runtime
stage's ENTRYPOINT, CMD, ENV, WORKDIR and HEALTHCHECK are returned with every image path
mapped into that folder. So a changed path, script or command in the Dockerfile changes
what the test runs.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.deploy.dockerfile import Dockerfile, Instruction, parse
from tests.deploy.helpers import REPO

DOCKERFILE = REPO / "Dockerfile"
# The base image's PATH (python:3.11-slim), after the image's own prefix.
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# RUN lines of the runtime stages that change the base system (users), not the app.
SYSTEM_RUN = re.compile(r"^(groupadd|useradd)\b")


@dataclass
class ImageRoot:
    root: Path
    dockerfile: Dockerfile
    owned: set[str] = field(default_factory=set)

    def path(self, image_path: str) -> Path:
        return self.root / image_path.lstrip("/")

    def map(self, text: str) -> str:
        """Every absolute path under a folder the recipe created, moved into the root."""

        def repl(m: re.Match[str]) -> str:
            p = m.group(0)
            if any(p == o or p.startswith(o.rstrip("/") + "/") for o in self.owned):
                return str(self.root) + p
            return p

        return re.sub(r"(?<![\w.$-])/[\w.+-]+(?:/[\w.+-]*)*", repl, text)


def _copy(image: ImageRoot, ins: Instruction, workdir: str) -> None:
    origin, sources, dest = ins.copy_parts()
    absolute = dest if dest.startswith("/") else posixpath.join(workdir, dest)
    target = image.path(absolute)
    if origin is not None:
        # COPY --from=<build stage> /same/path: the replayed build already wrote it there
        assert sources == [absolute], f"line {ins.line}: COPY --from must keep the path"
        assert target.exists(), f"line {ins.line}: {absolute} was not built"
        return
    for source in sources:
        src = REPO / source
        if src.is_dir():
            shutil.copytree(
                src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        elif dest.endswith("/") or len(sources) > 1:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / src.name)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)


def build(root: Path, target: str, build_args: dict[str, str], log: Path) -> ImageRoot:
    """Replay ``target``'s chain and the build stages its COPY --from lines name."""
    image = ImageRoot(root=root, dockerfile=parse(DOCKERFILE))
    df = image.dockerfile
    # Every folder the recipe writes, known before anything runs, so that no command of
    # the replay can touch the same path on this machine.
    for stage in df.stages:
        workdir = "/"
        for ins in stage.instructions:
            if ins.keyword == "WORKDIR":
                workdir = ins.value.strip()
                image.owned.add(workdir)
            elif ins.keyword == "COPY":
                origin, sources, dest = ins.copy_parts()
                absolute = dest if dest.startswith("/") else posixpath.join(workdir, dest)
                if origin is not None:
                    image.owned.update(s for s in sources if s.startswith("/"))
                    image.owned.add(absolute)
                elif dest.endswith("/") or len(sources) > 1:
                    image.owned.add(absolute.rstrip("/"))
                else:
                    image.owned.add(posixpath.dirname(absolute))
    image.owned.discard("/")
    stage_names = {s.name for s in df.stages}
    needed = {s.name for s in df.chain(target)}
    for stage in df.chain(target):
        for ins in stage.all("COPY"):
            origin = ins.copy_parts()[0]
            if origin in stage_names:
                needed.update(s.name for s in df.chain(origin))
    order = [s.name for s in df.stages if s.name in needed]
    for name in order:
        _replay_stage(image, name, build_args, log)
    return image


def _replay_stage(image: ImageRoot, name: str, build_args: dict[str, str], log: Path) -> None:
    df = image.dockerfile
    chain = df.chain(name)
    workdir = "/"
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    for stage in chain:
        for ins in stage.instructions:
            if ins.keyword == "WORKDIR":
                workdir = ins.value.strip()
            elif ins.keyword == "ARG":
                key, _, default = ins.value.partition("=")
                args[key] = build_args.get(key, default)
            elif ins.keyword == "ENV":
                env.update(df.config(stage.name).env)
            if stage.name != name:
                continue  # ancestors' effects are replayed when they are built themselves
            if ins.keyword == "WORKDIR":
                image.path(workdir).mkdir(parents=True, exist_ok=True)
            elif ins.keyword == "COPY":
                _copy(image, ins, workdir)
            elif ins.keyword == "RUN":
                if SYSTEM_RUN.match(ins.value):
                    continue
                _run(image, ins, workdir, {**args, **env}, log)


def _run(
    image: ImageRoot, ins: Instruction, workdir: str, variables: dict[str, str], log: Path
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MIRRORGATE_", "PIP_", "VIRTUAL_ENV"))
    }
    env.update({k: image.map(v) for k, v in variables.items()})
    # Docker's layer cache stands in for pip's cache here: without it each run downloads
    # every wheel again.
    env.pop("PIP_NO_CACHE_DIR", None)
    # Byte-compiling every installed module is an image start-up optimisation that costs
    # a minute on a 2-core machine; it changes nothing the tests look at.
    env["PIP_NO_COMPILE"] = "1"
    command = image.map(ins.value)
    with log.open("a") as out:
        out.write(f"\n$ {command}\n")
        out.flush()
        result = subprocess.run(
            ["bash", "-c", command],
            cwd=image.path(workdir),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=1200,
            check=False,
        )
    if result.returncode != 0:
        tail = log.read_text()[-6000:]
        raise AssertionError(f"Dockerfile line {ins.line} failed ({result.returncode}):\n{tail}")
