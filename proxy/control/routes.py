"""The control plane (``/v1/...``): labels in, rollout state out, rollouts started and
closed, operator overrides.

Every route needs ``Authorization: Bearer <token>`` (compared in constant time) of the
right scope (proxy/dataplane/auth.py): the read token for verdicts and state, the write token for
actions; with no token configured the control plane answers 401 — a proxy that can
promote a model never does so for an anonymous caller. Flagger's webhooks
(``/v1/flagger/<hook>``) may carry the token in their metadata instead (Flagger sends no
headers). Verdicts answer for one candidate revision (proxy/control/lifecycle.py). Errors leave
through the app's one error middleware as ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict
from typing import Any, cast

from aiohttp import web

from gates.engine import ManualAction
from gates.join import LabelEvent
from proxy.control.harvest import Harvester
from proxy.control.lifecycle import LIFECYCLE, parse_revision, setup_lifecycle
from proxy.control.pinned import case_to_dict, parse_triage
from proxy.control.rollout import RolloutService
from proxy.core.errors import BadRequest, Conflict, NotFound, NotReady
from proxy.dataplane.auth import Scope, bearer_of, check_scope
from proxy.dataplane.limits import request_body
from proxy.dataplane.state import HARVESTER, STATE, ProxyState
from storage.entities import PINNED_STATUSES
from storage.errors import InvalidError, NotFoundError, StorageError
from storage.store import Store

MAX_LABELS_PER_REQUEST = 10_000
MAX_ID_LEN = 256
MANUAL_ACTIONS = ("promote", "abort", "pause", "resume")


def _state(request: web.Request, scope: Scope = "write") -> ProxyState:
    state = request.app[STATE]
    check_scope(state.config, scope, bearer_of(request))
    return state


def _read(request: web.Request) -> ProxyState:
    return _state(request, "read")


def _revision_query(request: web.Request) -> str | None:
    raw = request.query.get("revision")
    return None if raw is None else parse_revision(raw)


def _rollout(state: ProxyState) -> RolloutService:
    if state.rollout is None:
        raise NotReady("no rollout: this proxy has no candidate configured")
    return state.rollout


async def _json(request: web.Request) -> Any:
    body = await request_body(request)
    if not body:
        raise BadRequest("empty body: expected JSON")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc


def parse_labels(body: Any) -> list[LabelEvent]:
    """``{"id", "label", "ts"?}`` or a list of them; every fault names its index."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise BadRequest("no labels given")
    if len(items) > MAX_LABELS_PER_REQUEST:
        raise BadRequest(f"at most {MAX_LABELS_PER_REQUEST} labels per request")
    events = []
    for i, item in enumerate(items):
        where = f"labels[{i}]" if isinstance(body, list) else "label"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: expected an object with 'id' and 'label'")
        unknown = set(item) - {"id", "label", "ts"}
        if unknown:
            raise BadRequest(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        rid = item.get("id")
        if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_LEN:
            raise BadRequest(f"{where}.id: expected a non-empty string of <= {MAX_ID_LEN} chars")
        if "label" not in item or item["label"] is None:
            raise BadRequest(f"{where}.label: missing")
        label = item["label"]
        if not _valid_label(label):
            raise BadRequest(
                f"{where}.label: expected a class (int or string), a finite number, "
                "or a list of finite numbers"
            )
        ts = item.get("ts")
        if ts is not None and (
            not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts)
        ):
            raise BadRequest(f"{where}.ts: expected a finite number (epoch seconds)")
        events.append(LabelEvent(id=rid, label=label, ts=None if ts is None else float(ts)))
    return events


def _valid_label(label: Any) -> bool:
    if isinstance(label, bool):
        return False
    if isinstance(label, int | str):
        return True
    if isinstance(label, float):
        return math.isfinite(label)
    if isinstance(label, list) and label:
        return all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            for x in label
        )
    return False


async def feedback(request: web.Request) -> web.Response:
    """Labels in. 202 with a status per label: ``joined`` (its pair was seen and is now
    labelled) or ``pending`` (no pair with that id yet: kept for
    ``storage.label_window_s``, since a label may arrive before its pair; one that never
    meets its pair is counted and listed in ``GET /v1/rollout`` under
    ``queues.labels_unmatched``/``labels_unmatched_recent``). Malformed labels are a 400
    naming the fault, and then none of the request's labels is taken. With several
    replicas the labels are committed to the shared database before the 202
    (``"stored": true``) and ``joined`` means their pair is stored (docs/replicas.md).
    """
    state = _state(request)
    events = parse_labels(await _json(request))
    recorder = state.persistence.recorder if state.persistence is not None else None
    if state.rollout is None and recorder is None:
        raise NotReady("labels have nowhere to go: no candidate (gates) and no storage")
    stored = True
    coordinator = state.rollout.coordinator if state.rollout is not None else None
    if coordinator is None and state.rollout is not None and state.config.replicas.enabled:
        # Still loading: a label joined locally now would reach the gates twice (this
        # replica's snapshot and the decider's ledger). Nothing is taken: retry.
        raise NotReady("replica starting: labels are taken once it joined the rollout")
    if coordinator is not None:
        # Several replicas: stored in the shared database before this 202, not through
        # the recorder's buffer (a SIGKILL must not lose an acknowledged label).
        try:
            statuses = await coordinator.store_labels(events)
        except StorageError as exc:
            raise NotReady(f"labels not stored (database unavailable), retry: {exc}") from exc
    else:
        if recorder is not None:
            stored = all(recorder.submit_label(e.id, e.label, e.ts) for e in events)
        if state.rollout is not None:
            statuses = await state.rollout.join_labels(events)
        else:
            # Storage only: the recorder joins them in the database when the pair lands.
            statuses = ["pending"] * len(events)
    if not stored:
        # The gates have them; the database buffer was full. Retrying is safe: a later
        # label for the same id replaces the earlier one.
        raise NotReady("labels reached the gates but the recorder buffer is full: retry")
    joined = statuses.count("joined")
    not_gated = statuses.count("not_gated")
    ops = request.app[LIFECYCLE].ops
    ops.labels.labels("joined").inc(joined)
    ops.labels.labels("pending").inc(len(events) - joined - not_gated)
    ops.labels.labels("not_gated").inc(not_gated)
    return web.json_response(
        {
            "accepted": len(events),
            # True: committed to the database before this answer (several replicas);
            # False: queued in the recorder's buffer (written within flush_interval_ms).
            "stored": coordinator is not None,
            "joined": joined,
            "pending": len(events) - joined - not_gated,
            # their pair will never be gated (candidate stopped, request not mirrored):
            # stored, not kept waiting in the gates' join
            "not_gated": not_gated,
            "labels": [{"id": e.id, "status": s} for e, s in zip(events, statuses, strict=True)],
        },
        status=202,
    )


async def rollout_status(request: web.Request) -> web.Response:
    state = _read(request)
    service = _rollout(state)
    info = request.app[LIFECYCLE].check_revision(_revision_query(request), verdict=False)
    body = service.status()
    body["rollout_id"] = info.id
    body["revision"] = info.revision
    body["closed"] = info.closed
    body["candidate_wire_identity"] = request.app[LIFECYCLE].wire_identity
    if state.champion is not None:
        body["champion"] = _identity(state.champion.identity)
    if state.candidate is not None:
        body["candidate"] = _identity(state.candidate.identity)
    harvester = state.extras.get(HARVESTER)
    if isinstance(harvester, Harvester):
        body["harvest"] = {**asdict(harvester.counters), "pinned_cases": len(harvester.pinned)}
    recorder = state.persistence.recorder if state.persistence is not None else None
    if recorder is not None:
        body["storage"] = {"file_problem": recorder.file_problem, "buffered": recorder.buffered}
    return web.json_response(body)


async def rollout_verdict(request: web.Request) -> web.Response:
    """The verdict for ``?revision=`` (the one being judged; another revision: 409)."""
    _rollout(_read(request))
    return web.json_response(request.app[LIFECYCLE].verdict(_revision_query(request)))


def _who_why(body: dict[str, Any], default_who: str, default_why: str) -> tuple[str, str]:
    who, why = body.get("who", default_who), body.get("why", default_why)
    if not isinstance(who, str) or not who.strip() or len(who) > 200:
        raise BadRequest("'who' must be a non-empty string of <= 200 characters")
    if not isinstance(why, str) or not why.strip() or len(why) > 2000:
        raise BadRequest("'why' must be a non-empty string of <= 2000 characters")
    return who, why


async def rollouts_start(request: web.Request) -> web.Response:
    """Start judging a candidate revision: 201 with the new rollout, or 200 with the
    current one when it already judges that revision (controllers retry)."""
    state = _state(request)
    _rollout(state)
    body = await _json(request)
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object {'revision': ..., 'who'?, 'why'?}")
    unknown = set(body) - {"revision", "who", "why"}
    if unknown:
        raise BadRequest(f"unknown field(s) {', '.join(sorted(unknown))}")
    revision = parse_revision(body.get("revision"))
    who, why = _who_why(body, "controller", "rollout started by a controller")
    info, created = await request.app[LIFECYCLE].start(revision, who=who, why=why)
    return web.json_response({**info.to_dict(), "created": created}, status=201 if created else 200)


async def rollouts_list(request: web.Request) -> web.Response:
    _read(request)
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError as exc:
        raise BadRequest("limit must be an integer") from exc
    if not 1 <= limit <= 1000:
        raise BadRequest("limit must lie in [1, 1000]")
    return web.json_response({"rollouts": await request.app[LIFECYCLE].list(limit)})


async def rollouts_close(request: web.Request) -> web.Response:
    """Close the rollout of ``revision`` (a post-rollout hook). 409 when stale."""
    _rollout(_state(request))
    body = await _json(request) if request.body_exists else {}
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object {'who'?, 'why'?}")
    revision = parse_revision(request.match_info["revision"])
    who, why = _who_why(body, "controller", "rollout closed by a controller")
    info = await request.app[LIFECYCLE].close(revision, who=who, why=why)
    return web.json_response(info.to_dict())


# Flagger calls its webhooks with {"name", "namespace", "phase", "checksum", "metadata"}
# and no way to add headers: the token travels in the webhook's metadata (docs/deploy.md).
FLAGGER_HOOKS: dict[str, Scope] = {
    "pre-rollout": "write",
    "rollout": "read",
    "confirm-promotion": "read",
    "rollback": "read",
    "post-rollout": "write",
}


async def flagger_webhook(request: web.Request) -> web.Response:
    """Flagger's webhooks, the revision being the payload's ``checksum``.

    pre-rollout starts the rollout; rollout answers 200 unless aborted (a failed check);
    confirm-promotion answers 200 only on promote (Flagger waits otherwise); rollback
    answers 200 on abort (Flagger rolls back at once); post-rollout closes it.
    """
    hook = request.match_info["hook"]
    if hook not in FLAGGER_HOOKS:
        raise NotFound(f"unknown Flagger hook {hook!r}; one of {', '.join(FLAGGER_HOOKS)}")
    state = request.app[STATE]
    body = await _json(request)
    if not isinstance(body, dict):
        raise BadRequest("expected Flagger's webhook payload (a JSON object)")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadRequest("metadata: expected an object")
    token = bearer_of(request) or metadata.get("token")
    check_scope(state.config, FLAGGER_HOOKS[hook], token if isinstance(token, str) else None)
    _rollout(state)
    revision = parse_revision(body.get("checksum"), "checksum")
    canary = f"{body.get('namespace', '?')}/{body.get('name', '?')}"
    lifecycle = request.app[LIFECYCLE]
    who = f"flagger:{canary}"
    if hook == "pre-rollout":
        info, created = await lifecycle.start(revision, who=who, why="Flagger pre-rollout hook")
        return web.json_response({**info.to_dict(), "created": created})
    if hook == "post-rollout":
        phase = body.get("phase", "?")
        info = await lifecycle.close(revision, who=who, why=f"Flagger post-rollout ({phase})")
        return web.json_response(info.to_dict())
    verdict = lifecycle.verdict(revision)
    ok = {
        "rollout": verdict["verdict"] != "abort",
        "confirm-promotion": verdict["verdict"] == "promote",
        "rollback": verdict["verdict"] == "abort",
    }[hook]
    if not ok:
        raise Conflict(f"{hook}: verdict {verdict['verdict']} for revision {revision}")
    return web.json_response(verdict)


async def rollout_action(request: web.Request) -> web.Response:
    state = _state(request)
    action = request.match_info["action"]
    if action not in MANUAL_ACTIONS:
        raise web.HTTPNotFound(text=f"unknown action {action!r}; one of {MANUAL_ACTIONS}")
    # body_exists, not can_read_body: the body may already be read (and cached) by
    # the limits middleware, which leaves the stream at its end.
    body = await _json(request) if request.body_exists else {}
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object {'who': ..., 'why': ...}")
    who, why = body.get("who"), body.get("why")
    if not isinstance(who, str) or not who.strip():
        raise BadRequest("'who' is required: the operator taking this action")
    if not isinstance(why, str) or not why.strip():
        raise BadRequest("'why' is required: the reason, recorded with the decision")
    if "revision" in body:
        request.app[LIFECYCLE].check_revision(parse_revision(body["revision"]))
    service = _rollout(state)
    evaluation = await service.manual(cast(ManualAction, action), who, why)
    info = request.app[LIFECYCLE].current()
    return web.json_response(
        {
            **evaluation.verdict_dict(),
            "rollout_id": info.id,
            "revision": info.revision,
            # False: the decision holds here but waits for the database (retried)
            "persisted": not service.unpersisted,
        }
    )


def _identity(identity: Any) -> dict[str, str]:
    return {
        "name": identity.name,
        "kind": identity.kind,
        "digest": identity.digest,
        "device": identity.device,
    }


def _store(state: ProxyState) -> Store:
    if state.persistence is None:
        raise NotReady("no pinned cases: storage is off on this proxy")
    return state.persistence.store


async def _blocking(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """A Store call in a thread, its errors mapped to HTTP statuses."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except NotFoundError as exc:
        raise NotFound(str(exc)) from exc
    except InvalidError as exc:
        raise BadRequest(str(exc)) from exc
    except StorageError as exc:
        raise NotReady(f"storage unavailable: {exc}") from exc


async def pinned_list(request: web.Request) -> web.Response:
    state = _read(request)
    store = _store(state)
    status = request.query.get("status") or None
    if status is not None and status not in PINNED_STATUSES:
        raise BadRequest(f"status must be one of {', '.join(PINNED_STATUSES)}")
    try:
        limit = int(request.query.get("limit", "1000"))
    except ValueError as exc:
        raise BadRequest("limit must be an integer") from exc
    if not 1 <= limit <= 100_000:
        raise BadRequest("limit must lie in [1, 100000]")
    task = request.query.get("task") or state.config.server.model_name
    cases = await _blocking(store.list_pinned, status=status, task=task, limit=limit)
    return web.json_response({"cases": [case_to_dict(c) for c in cases]})


def _case_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    # ASCII digits that fit the database's 64-bit id; anything else names no case.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        raise NotFound(f"no pinned case {raw[:40]!r}")
    return int(raw)


async def pinned_show(request: web.Request) -> web.Response:
    state = _read(request)
    store = _store(state)
    cid = _case_id(request)
    case = await _blocking(store.get_pinned, cid)
    history = await _blocking(store.triage_history, cid)
    return web.json_response(case_to_dict(case, history))


async def pinned_triage(request: web.Request) -> web.Response:
    state = _state(request)
    store = _store(state)
    cid = _case_id(request)
    triage = parse_triage(await _json(request))
    case = await _blocking(
        store.triage,
        cid,
        triage.status,
        actor=triage.who,
        reason=triage.why,
        expected_label=triage.expected_label,
        score_tolerance=triage.score_tolerance,
    )
    harvester = state.extras.get(HARVESTER)
    if isinstance(harvester, Harvester):
        harvester.update_case(case)
    history = await _blocking(store.triage_history, cid)
    return web.json_response(case_to_dict(case, history))


def add_control_routes(app: web.Application) -> None:
    setup_lifecycle(app)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_get("/v1/rollouts", rollouts_list)
    app.router.add_post("/v1/rollouts", rollouts_start)
    app.router.add_post("/v1/rollouts/{revision}/close", rollouts_close)
    app.router.add_post("/v1/flagger/{hook}", flagger_webhook)
    app.router.add_get("/v1/rollout", rollout_status)
    app.router.add_get("/v1/rollout/verdict", rollout_verdict)
    app.router.add_post("/v1/rollout/{action}", rollout_action)
    app.router.add_get("/v1/pinned", pinned_list)
    app.router.add_get("/v1/pinned/{id}", pinned_show)
    app.router.add_post("/v1/pinned/{id}", pinned_triage)
