"""Fixtures for the proxy tests: real V2 upstream servers and a proxy in front of them."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy.core.config import MirrorgateConfig, load_config
from proxy.dataplane.front import DelegateDir, FrontServer, start_front
from proxy.dataplane.limits import GuardedAppRunner, default_max_connections
from proxy.dataplane.state import STATE
from proxy.protocol.base import ModelIdentity, ModelMetadata, TensorSpec
from proxy.server.app import create_app, wait_loaded
from storage.sink import MemorySink
from tests.proxy.upstream import Stats, Upstream, UpstreamModel

N_FEATURES = 4
N_CLASSES = 3


class NumpyBackend:
    """An in-process backend around the upstreams' numpy model: mirrorgate is then the
    server (it decodes, validates and encodes), as with its ONNX/Torch backends."""

    def __init__(self, model: UpstreamModel) -> None:
        self.model = model
        self.calls = 0
        self.stats = Stats()  # `started`, like the test upstream's
        meta = model.metadata()
        self._metadata = ModelMetadata(
            name=meta["name"],
            platform=meta["platform"],
            inputs=tuple(
                TensorSpec(i["name"], i["datatype"], tuple(i["shape"])) for i in meta["inputs"]
            ),
            outputs=tuple(
                TensorSpec(o["name"], o["datatype"], tuple(o["shape"])) for o in meta["outputs"]
            ),
            versions=("1",),
        )
        self._identity = ModelIdentity(name="champion", kind="numpy", digest="numpy")

    @property
    def metadata(self) -> ModelMetadata:
        return self._metadata

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    async def infer(
        self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        self.calls += 1
        self.stats.started += 1
        result = await asyncio.to_thread(self.model.predict, inputs[self.model.input_name])
        return result if outputs is None else {n: result[n] for n in outputs if n in result}

    async def aclose(self) -> None:
        return None


class RunningUpstream:
    def __init__(self, upstream: Upstream, url: str) -> None:
        self.upstream = upstream
        self.url = url
        self.model = upstream.model


@pytest.fixture
def start_upstream(aiohttp_server: Any) -> Callable[..., Awaitable[RunningUpstream]]:
    """``await start_upstream(seed=1)``: a real V2 server on a free loopback port."""

    async def start(seed: int = 0, raw_bodies: bool = False, **fault: Any) -> RunningUpstream:
        upstream = Upstream(
            UpstreamModel(N_FEATURES, N_CLASSES, seed), seed=seed, raw_bodies=raw_bodies
        )
        if fault:
            upstream.set_fault(**fault)
        server = await aiohttp_server(upstream.app())
        return RunningUpstream(upstream, str(server.make_url("")).rstrip("/"))

    return start


def make_config(
    champion_url: str, candidate_url: str | None = None, **sections: Any
) -> MirrorgateConfig:
    """A config whose models are http backends on the given upstreams."""
    # Generous deadlines by default: the 2-core CI machine is shared and loaded, and a
    # loopback call that merely waits for a CPU must not read as a timeout. Tests about
    # timeouts set their own.
    models: dict[str, Any] = {
        "champion": {
            "name": "champion",
            "kind": "http",
            "url": champion_url,
            "model": "model",
            "timeout_ms": 10_000,
        }
    }
    if candidate_url is not None:
        models["candidate"] = {
            "name": "candidate",
            "kind": "http",
            "url": candidate_url,
            "model": "model",
            "timeout_ms": 10_000,
        }
    data: dict[str, Any] = {
        "server": {"model_name": "classifier"},
        "models": models,
        "mirror": {"timeout_ms": 10_000},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            for sub, subvalue in value.items():
                if isinstance(subvalue, dict) and isinstance(data[key].get(sub), dict):
                    data[key][sub] = {**data[key][sub], **subvalue}
                else:
                    data[key][sub] = subvalue
        else:
            data[key] = value
    return load_config(data=data, env={})


class Proxy:
    """A running proxy app and what tests look at."""

    def __init__(self, client: TestClient, sink: MemorySink, registry: CollectorRegistry):
        self.client = client
        self.sink = sink
        self.registry = registry
        self.state = client.app[STATE] if client.app is not None else None

    @property
    def front(self) -> FrontServer | None:
        """The byte-level front when the proxy is served through it."""
        server = self.client.server
        return server.front if isinstance(server, FrontTestServer) else None

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


class FrontTestServer(TestServer):
    """The app behind the byte-level front (proxy/dataplane/front.py), as ``serve`` runs
    it with ``server.live_path: bytes``: the front on a loopback port, the app on a
    private Unix socket behind it."""

    front: FrontServer | None = None
    where: DelegateDir | None = None

    async def start_server(self, **kwargs: Any) -> None:
        if self.runner:
            return
        state = self.app[STATE]
        limits = state.config.server.limits
        cap = limits.max_connections or default_max_connections()
        runner = GuardedAppRunner(
            self.app,
            max_connections=cap * 2,
            registry=state.registry,
            keepalive_timeout=limits.keepalive_timeout_s,
            access_log=None,
        )
        self.runner = runner
        await runner.setup()
        self.front, self.where, (host, port) = await start_front(
            runner, state, "127.0.0.1", 0, limits=limits, max_connections=cap, shed=runner.shed
        )
        self.host, self.port, self.scheme = host, port, "http"
        self._root = URL(f"http://{host}:{port}")

    async def close(self) -> None:
        if self.front is not None:
            self.front.stop_accepting()
            await self.front.drain(self.app[STATE].config.server.shutdown_timeout_s)
        await super().close()
        if self.front is not None:
            self.front.close()
        if self.where is not None:
            self.where.remove()


@pytest.fixture
def live_path() -> str:
    """Which live path ``start_proxy`` serves through; modules that hold for both
    override it with ``params=LIVE_PATHS``."""
    return "aiohttp"


LIVE_PATHS = ["aiohttp", "bytes"]


@pytest.fixture
def start_proxy(aiohttp_client: Any, live_path: str) -> Callable[..., Awaitable[Proxy]]:
    """``await start_proxy(config)``: the proxy app with a MemorySink, models loaded,
    served through ``live_path`` (the byte-level front when "bytes")."""

    async def start(config: MirrorgateConfig, **kwargs: Any) -> Proxy:
        return await serve_proxy(aiohttp_client, config, live_path, **kwargs)

    return start


async def serve_proxy(
    aiohttp_client: Any, config: MirrorgateConfig, live_path: str, **kwargs: Any
) -> Proxy:
    """A proxy app with a MemorySink, models loaded, served through ``live_path``."""
    sink = kwargs.pop("sink", None) or MemorySink()
    registry = CollectorRegistry()
    app = create_app(config, sinks=[sink], registry=registry, **kwargs)
    if live_path == "bytes":
        client = await aiohttp_client(FrontTestServer(app))
    else:
        client = await aiohttp_client(app)
    await wait_loaded(app)
    return Proxy(client, sink, registry)
