"""The rollout lifecycle: one rollout judges one candidate revision (docs/deploy.md).

Controllers start a rollout for the revision they are about to ship (Argo Rollouts: an
analysis step that ``POST``s ``podTemplateHashValue: Latest``; Flagger: the pre-rollout
webhook's ``checksum``), read the verdict *for that revision* (any other revision's
verdict is refused: 409, so a second rollout can never act on the first one's verdict),
and close it (Flagger's post-rollout webhook). A new start supersedes the rollout before
it: fresh evidence, the first stage of the plan, the candidate called again.

The candidate's identity is also watched on the wire (``lifecycle.identity_poll_s``):
its V2 metadata and the revision header. When it changes under a running rollout, the
proxy either stops judging (``refuse``: verdicts 409, pairs not counted, the candidate
not called) until a rollout is started for the new revision, or opens one itself
(``new_rollout``).

With several replicas (``replicas.enabled``) the replica that receives the start creates
the rollout; the others follow within ``replicas.snapshot_every_s`` (they poll the
newest rollout of the experiment), each handing the old rollout's decider lease back
and joining the new rollout's shared decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from proxy.control.harvest import Harvester
from proxy.control.ops_metrics import OpsMetrics
from proxy.control.persistence import INITIAL_REVISION, revision_of
from proxy.control.rollout import RolloutService
from proxy.core.errors import BadRequest, Conflict, MirrorgateError, NotReady
from proxy.dataplane.state import HARVESTER, STATE, ProxyState
from storage.entities import Rollout

log = logging.getLogger(__name__)

MAX_REVISION_LEN = 200
# Printable ASCII without spaces: revisions go into ids, labels, logs and URLs.
_REVISION_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


@dataclass(slots=True)
class RolloutInfo:
    """What the lifecycle endpoints say about one rollout."""

    id: str
    revision: str
    status: str  # active | promoted | aborted | ended
    stage: str
    created_at: float
    ended_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def closed(self) -> bool:
        return "closed_at" in self.extra

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.id,
            "revision": self.revision,
            "status": self.status,
            "stage": self.stage,
            "created_at": self.created_at,
            "ended_at": self.ended_at,
            "closed": self.closed,
            "closed_at": self.extra.get("closed_at"),
            "started_by": self.extra.get("started_by"),
            "reason": self.extra.get("reason"),
        }


def _info(rollout: Rollout) -> RolloutInfo:
    return RolloutInfo(
        id=rollout.id,
        revision=revision_of(rollout),
        status=rollout.status,
        stage=rollout.stage,
        created_at=rollout.created_at,
        ended_at=rollout.ended_at,
        extra=dict(rollout.extra),
    )


def _same(rollout: Rollout) -> Rollout:
    return rollout


def parse_revision(value: Any, where: str = "revision") -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"'{where}' is required: the candidate revision (a non-empty string)")
    if len(value) > MAX_REVISION_LEN or not set(value) <= _REVISION_CHARS:
        raise BadRequest(
            f"'{where}' must be at most {MAX_REVISION_LEN} printable ASCII characters, "
            "without spaces"
        )
    return value


class RolloutLifecycle:
    def __init__(self, state: ProxyState, ops: OpsMetrics) -> None:
        self.state = state
        self.ops = ops
        self.settings = state.config.lifecycle
        self._lock = asyncio.Lock()
        # Without storage the rollouts live in this process only.
        self._memory: list[RolloutInfo] = []
        self._wire: str | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ state

    @property
    def wire_identity(self) -> str | None:
        """The candidate's identity as last seen on the wire (None: not yet learnt)."""
        return self._wire

    @property
    def service(self) -> RolloutService:
        if self.state.rollout is None:
            raise NotReady("no rollout: this proxy has no candidate configured")
        return self.state.rollout

    def current(self) -> RolloutInfo:
        persistence = self.state.persistence
        if persistence is not None:
            if persistence.rollout is None:
                raise NotReady("not ready: the rollout is being resumed (models are loading)")
            info = _info(persistence.rollout)
        else:
            if not self._memory:
                self._memory.append(
                    RolloutInfo(
                        id="m-1",
                        revision=self.settings.revision or INITIAL_REVISION,
                        status="active",
                        stage=self.state.config.rollout.stages[0].name,
                        created_at=time.time(),
                        extra={"started_by": "config"},
                    )
                )
            info = self._memory[-1]
        if self.state.rollout is not None:
            # The live decision, not the row's last write (which may lag one tick).
            evaluation = self.state.rollout.current()
            info.stage = evaluation.stage
            if evaluation.verdict in ("promote", "abort"):
                info.status = "promoted" if evaluation.verdict == "promote" else "aborted"
        return info

    def check_revision(self, revision: str | None, *, verdict: bool = True) -> RolloutInfo:
        """The current rollout, if ``revision`` names it; a stale revision is a 409.
        ``lifecycle.require_revision`` applies to verdicts (what controllers act on),
        not to a person reading the state."""
        info = self.current()
        if revision is None:
            if verdict and self.settings.require_revision:
                raise BadRequest("name the candidate revision: ?revision=<revision>")
            return info
        if revision != info.revision:
            raise Conflict(
                f"stale: revision {revision!r} is not the one being judged (rollout "
                f"{info.id} judges revision {info.revision!r}); start a rollout for it "
                "first: POST /v1/rollouts"
            )
        suspended = self.service.suspended
        if suspended is not None:
            raise Conflict(f"not judging: {suspended}")
        return info

    def verdict(self, revision: str | None) -> dict[str, Any]:
        info = self.check_revision(revision)
        # The shared decision's body (with its ``seq`` under replicas: identical on
        # every replica serving that decision), bound to its rollout and revision.
        body = self.service.verdict_body()
        evaluation = self.service.current()
        body.update(
            rollout_id=info.id,
            revision=info.revision,
            closed=info.closed,
            stage_index=evaluation.stage_index,
            stages=list(evaluation.stages),
        )
        return body

    # ------------------------------------------------------------------ actions

    async def start(self, revision: str, *, who: str, why: str) -> tuple[RolloutInfo, bool]:
        """Start judging ``revision``; idempotent while it is the open current rollout."""
        async with self._lock:
            service = self.service
            info = self.current()
            if info.revision == revision and not info.closed:
                return info, False
            extra = {"started_by": who, "reason": why}
            persistence = self.state.persistence
            if persistence is not None:
                # Created before the switch: a database that refuses leaves the current
                # rollout untouched (503, the controller retries).
                verdict = service.current().verdict

                def create() -> Rollout:
                    assert persistence is not None
                    return persistence.start_rollout(revision, extra, verdict=verdict)

                new = _info(await self._switch(create))
            else:
                if self._memory:
                    self._memory[-1].status = (
                        self._memory[-1].status if self._memory[-1].status != "active" else "ended"
                    )
                new = RolloutInfo(
                    id=f"m-{len(self._memory) + 1}",
                    revision=revision,
                    status="active",
                    stage=self.state.config.rollout.stages[0].name,
                    created_at=time.time(),
                    extra=extra,
                )
                self._memory.append(new)
                if self.state.mirror is not None:
                    self.state.mirror.restart_candidate()
                await service.reset(time.time())
            harvester = self.state.extras.get(HARVESTER)
            if harvester is not None and hasattr(harvester, "rollout_id"):
                harvester.rollout_id = new.id
            self._wire = None  # the new revision's identity is learnt at the next poll
            self.ops.set_rollout(new.id, new.revision)
            log.info("rollout %s started for revision %s by %s: %s", new.id, revision, who, why)
            return self.current(), True

    async def _switch(self, rollout: Callable[[], Rollout]) -> Rollout:
        """Move this proxy to another rollout (``rollout`` creates or finds it, blocking):
        fresh engine, recorder and harvester on the new id, candidate callable again;
        with replicas, the old rollout's coordinator hands back its lease and a new one
        joins the new rollout's decision."""
        service = self.service
        persistence = self.state.persistence
        assert persistence is not None
        got: list[Rollout] = []

        async def switch() -> None:
            try:
                found = await asyncio.to_thread(rollout)
            except Exception as exc:
                raise NotReady(f"cannot start the rollout: storage: {exc}") from exc
            got.append(found)
            if service.coordinator is not None:
                old, service.coordinator = service.coordinator, None
                try:
                    await old.aclose()
                except Exception:
                    log.exception("closing the previous rollout's replica coordinator failed")
            persistence.switch(found)
            if self.state.config.replicas.enabled:
                from proxy.control.replicas import ReplicaCoordinator

                # In the same step as the switch (no await between): from the moment
                # this replica answers for the new rollout, a manual action on it goes
                # to the shared decision, never to the local engine alone.
                service.coordinator = ReplicaCoordinator(self.state.config, persistence, service)
            if self.state.mirror is not None:
                self.state.mirror.restart_candidate()

        await service.reset(time.time(), switch)
        if service.coordinator is not None:
            await service.coordinator.start()
        await self._check_pinned()
        return got[0]

    async def _check_pinned(self) -> None:
        """The new revision meets the pinned-failure set first, as a fresh start does
        (docs/pinned.md): a miss aborts the new rollout before it is judged on traffic."""
        harvester = self.state.extras.get(HARVESTER)
        candidate = self.state.candidate
        if not isinstance(harvester, Harvester) or candidate is None:
            return
        if not self.state.config.gates.pinned.enabled:
            return
        try:
            cases = await asyncio.to_thread(harvester.load_pinned)
            if cases:
                await harvester.check_candidate(candidate, self.service, cases)
        except Exception:
            log.exception("checking the new revision against the pinned set failed")

    async def _follow_replicas(self) -> None:
        """Replicas: another replica started (or closed) a rollout; follow it."""
        persistence = self.state.persistence
        assert persistence is not None
        config = self.state.config
        while True:
            await asyncio.sleep(config.replicas.snapshot_every_s)
            try:
                current = persistence.rollout
                assert current is not None and persistence.champion_info is not None
                latest = await asyncio.to_thread(
                    persistence.store.latest_rollout,
                    persistence.champion_info,
                    persistence.candidate_info,
                    config_digest=config.digest(),
                    task=config.server.model_name,
                )
                if latest is None:
                    continue
                if latest.id != current.id and latest.created_at >= current.created_at:
                    async with self._lock:
                        if persistence.rollout is current:
                            log.info("following rollout %s started on another replica", latest.id)
                            await self._switch(functools.partial(_same, latest))
                            self.ops.set_rollout(latest.id, revision_of(latest))
                            harvester = self.state.extras.get(HARVESTER)
                            if harvester is not None and hasattr(harvester, "rollout_id"):
                                harvester.rollout_id = latest.id
                elif latest.id == current.id and "closed_at" in latest.extra:
                    if "closed_at" not in current.extra:
                        persistence.rollout = latest
                        if self.state.mirror is not None:
                            self.state.mirror.stop_candidate()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("following the replicas' rollout failed", exc_info=True)

    async def close(self, revision: str, *, who: str, why: str) -> RolloutInfo:
        """The controller is done with ``revision`` (Flagger's post-rollout hook): the
        rollout ends (a promote or abort stays as decided) and its candidate is no
        longer called. Its verdict is still served for that revision."""
        async with self._lock:
            info = self.check_revision(revision)
            if info.closed:
                return info
            extra = {"closed_at": time.time(), "closed_by": who, "close_reason": why}
            persistence = self.state.persistence
            if persistence is not None:
                try:
                    await asyncio.to_thread(
                        functools.partial(
                            persistence.close_rollout, extra, verdict=self.service.current().verdict
                        )
                    )
                except Exception as exc:
                    raise NotReady(f"cannot close the rollout: storage: {exc}") from exc
            else:
                info.extra.update(extra)
                if info.status == "active":
                    info.status = "ended"
            if self.state.mirror is not None:
                self.state.mirror.stop_candidate()
            log.info("rollout %s (revision %s) closed by %s: %s", info.id, revision, who, why)
            return self.current()

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        current = self.current()
        persistence = self.state.persistence
        if persistence is None:
            rows = list(reversed(self._memory))[:limit]
        else:
            try:
                stored = await asyncio.to_thread(persistence.store.list_rollouts, limit=limit)
            except Exception as exc:
                raise NotReady(f"storage unavailable: {exc}") from exc
            task = self.state.config.server.model_name
            rows = [_info(r) for r in stored if r.task == task]
        out = []
        for row in rows:
            body = (current if row.id == current.id else row).to_dict()
            body["current"] = row.id == current.id
            out.append(body)
        return out

    # ------------------------------------------------------------------ background

    async def on_startup(self, app: web.Application) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._after_load()))

    async def on_shutdown(self, app: web.Application) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()

    async def on_cleanup(self, app: web.Application) -> None:
        await self.on_shutdown(app)
        if self._session is not None:
            await self._session.close()

    async def _after_load(self) -> None:
        state = self.state
        if state.loading is not None:
            with contextlib.suppress(BaseException):
                await asyncio.shield(state.loading)
        if state.rollout is None or state.champion is None:
            return
        info = self.current()
        self.ops.set_rollout(info.id, info.revision)
        if info.closed and state.mirror is not None:
            state.mirror.stop_candidate()  # a restart keeps a closed rollout's candidate idle
        if state.config.replicas.enabled and state.persistence is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self._follow_replicas()))
        if self.settings.identity_poll_s > 0 and hasattr(state.candidate, "base_url"):
            await self._watch_identity()

    async def _watch_identity(self) -> None:
        while True:
            try:
                await self.check_identity()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("checking the candidate's identity failed", exc_info=True)
            await asyncio.sleep(self.settings.identity_poll_s)

    async def fingerprint(self) -> tuple[str, str | None] | None:
        """(fingerprint, revision named by the server) of the candidate now, or None
        when it cannot be asked (unreachable: the mirror's own counters say so)."""
        candidate = self.state.candidate
        base, model = getattr(candidate, "base_url", None), getattr(candidate, "model", None)
        if not isinstance(base, str) or not isinstance(model, str):
            return None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        url = f"{base}/v2/models/{quote(model, safe='')}"
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    return None
                named = resp.headers.get(self.settings.revision_header)
                body = await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return None
        if named:
            return f"revision:{named}", named
        try:
            meta = json.loads(body)
        except ValueError:
            return None
        if not isinstance(meta, dict):
            return None
        # What identifies a model version on the wire: its versions and signature.
        keys = ("name", "versions", "platform", "inputs", "outputs")
        blob = json.dumps({k: meta.get(k) for k in keys}, sort_keys=True).encode()
        return "metadata:" + hashlib.sha256(blob).hexdigest()[:16], None

    async def check_identity(self) -> None:
        seen = await self.fingerprint()
        if seen is None:
            return
        fingerprint, named = seen
        if self._wire is None:
            self._wire = fingerprint
            return
        if fingerprint == self._wire:
            return
        old, self._wire = self._wire, fingerprint
        why = f"the candidate's identity changed on the wire: {old} -> {fingerprint}"
        if self.settings.on_identity_change == "new_rollout":
            revision = named or "wire-" + fingerprint.split(":", 1)[1]
            self.ops.identity_changes.labels("new_rollout").inc()
            log.warning("%s: starting a rollout for revision %s", why, revision)
            await self.start(revision, who="mirrorgate", why=why)
            self._wire = fingerprint
            return
        self.ops.identity_changes.labels("refused").inc()
        log.warning("%s: not judging until a rollout is started for it", why)
        self.service.suspended = f"{why}; start a rollout for the new revision (POST /v1/rollouts)"
        if self.state.mirror is not None:
            self.state.mirror.stop_candidate()


def live_latency_middleware(ops: OpsMetrics) -> Any:
    """End-to-end latency of live inference requests, as their client sees it."""

    # One child per status class, looked up once (labels() locks and builds a key).
    by_class: dict[int, Any] = {}

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method != "POST" or not request.path.endswith("/infer"):
            response: web.StreamResponse = await handler(request)
            return response
        started = time.perf_counter()
        code = 500
        try:
            response = await handler(request)
            code = response.status
            return response
        except (web.HTTPException, MirrorgateError) as exc:
            code = exc.status
            raise
        finally:
            cls = code // 100
            child = by_class.get(cls)
            if child is None:
                child = by_class[cls] = ops.live_duration.labels(f"{cls}xx")
            child.observe(time.perf_counter() - started)

    return middleware


LIFECYCLE = web.AppKey("mirrorgate_lifecycle", RolloutLifecycle)


def setup_lifecycle(app: web.Application) -> RolloutLifecycle:
    state = app[STATE]
    ops = OpsMetrics(state.registry)
    lifecycle = RolloutLifecycle(state, ops)
    app[LIFECYCLE] = lifecycle
    if state.rollout is not None:
        service = state.rollout
        service.observer = ops
        ops.labels_unmatched.set_function(lambda: float(service.runner.unmatched_total))
    app.middlewares.append(live_latency_middleware(ops))
    app.on_startup.append(lifecycle.on_startup)
    app.on_shutdown.append(lifecycle.on_shutdown)
    app.on_cleanup.append(lifecycle.on_cleanup)
    return lifecycle
