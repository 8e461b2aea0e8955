"""Routes that manage users over HTTP: admin routes (users and keys) and a user's own routes (their
history, their training jobs). The logic is the users service's; this file only maps it to HTTP."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from tailorlm.serve.protocol import ApiError, Utf8Body
from tailorlm.serve.server import Server
from tailorlm.store.index import HistoryRecord
from tailorlm.users.errors import UserError
from tailorlm.users.keys import KeyOwner

Guard = Callable[[Server, Request], KeyOwner]
UserGuard = Callable[[Server, Request, str], KeyOwner]


class NewUser(Utf8Body):
    user_id: str  # the id rule is the users layer's (``users.identity.check_user_id``): a 400 naming it
    kind: str | None = None
    issue_key: bool = True


class HistoryItemIn(BaseModel):
    input: str = Field(max_length=100_000)
    target: str = Field(max_length=100_000)
    item_id: str | None = Field(default=None, min_length=1, max_length=256)
    split: str = "train"
    # The task's item answered (shared between users): what a collab user's vector is folded in from.
    item_key: str | None = Field(default=None, min_length=1, max_length=256)


class HistoryIn(Utf8Body):
    items: list[HistoryItemIn] = Field(min_length=1, max_length=10_000)
    retrain: bool = True


def user_error(error: UserError, status: int = 400) -> ApiError:
    """A users-layer mistake as an HTTP answer: 404 for a user that does not exist (or no longer does)."""
    message = str(error)
    if message.startswith("no user "):
        status = 404
    return ApiError(status, message, code="user_not_found" if status == 404 else "invalid_user_request")


def register(app: FastAPI, server: Server, admin: Guard, self_or_admin: UserGuard) -> None:
    service = server.service

    @app.post("/v1/users", status_code=201)
    def add_user(body: NewUser, request: Request) -> dict:
        admin(server, request)
        try:
            info = service.add(body.user_id, body.kind)
            key = service.issue_key(body.user_id) if body.issue_key else None
        except UserError as error:
            raise user_error(error, 409 if "already exists" in str(error) else 400) from None
        return {"object": "user", **info.to_dict(), "api_key": key}

    @app.get("/v1/users")
    def list_users(request: Request) -> dict:
        admin(server, request)
        return {"object": "list", "data": [{"object": "user", **u.to_dict()} for u in service.list_users()]}

    @app.get("/v1/users/{user_id}")
    def show_user(user_id: str, request: Request) -> dict:
        self_or_admin(server, request, user_id)
        try:
            return {"object": "user", **service.show(user_id).to_dict()}
        except UserError as error:
            raise user_error(error) from None

    @app.delete("/v1/users/{user_id}")
    def delete_user(user_id: str, request: Request) -> dict:
        admin(server, request)
        try:
            # First, in one transaction: their rows and keys go and their tombstone is written, so from
            # here no request, history post or finishing retrain of theirs can write anything again.
            forgotten = service.delete(user_id)
        except UserError as error:
            raise user_error(error) from None
        cleared = server.forget_in_memory(user_id)  # their retrain, slots and history-derived caches
        return {
            "object": "user.deleted",
            "id": user_id,
            "deleted": True,
            "slots_cleared": cleared,
            **vars(forgotten),
        }

    @app.post("/v1/users/{user_id}/keys", status_code=201)
    def issue_key(user_id: str, request: Request) -> dict:
        admin(server, request)
        try:
            return {"object": "api_key", "user_id": user_id, "api_key": service.issue_key(user_id)}
        except UserError as error:
            raise user_error(error) from None

    @app.delete("/v1/users/{user_id}/keys")
    def revoke_keys(user_id: str, request: Request) -> dict:
        admin(server, request)
        try:
            return {"object": "api_key.revoked", "user_id": user_id, "revoked": service.revoke_keys(user_id)}
        except UserError as error:
            raise user_error(error) from None

    @app.post("/v1/users/{user_id}/history", status_code=202)
    def add_history(user_id: str, body: HistoryIn, request: Request) -> dict:
        self_or_admin(server, request, user_id)
        items = [
            HistoryRecord(
                item.item_id or f"api-{uuid.uuid4().hex[:16]}",
                item.input,
                item.target,
                item.split,
                item_key=item.item_key,
            )
            for item in body.items
        ]
        try:
            added = service.add_history(user_id, items)
        except UserError as error:
            raise user_error(error) from None
        job = server.jobs.start(user_id) if body.retrain and server.config.retrain and added else None
        return {
            "object": "history.added",
            "user_id": user_id,
            "added": added,
            "job": job.to_dict() if job else None,
        }

    @app.get("/v1/users/{user_id}/jobs/{job_id}")
    def job_status(user_id: str, job_id: str, request: Request) -> dict:
        self_or_admin(server, request, user_id)
        job = server.jobs.get(job_id)
        if job is None or job.user_id != user_id:
            raise ApiError(
                404, f"no training job {job_id!r} for this user", code="job_not_found", param="job_id"
            )
        return job.to_dict()
