"""A fake Reddit API for praw: the password-grant token endpoint, ``api/submit``, ``api/comment``.

Serve it as both ``REDDIT_URL`` and ``REDDIT_OAUTH_URL``. It answers like Reddit: errors inside
``{"json": {"errors": [[code, message, field]]}}`` (RATELIMIT, DELETED_COMMENT, DELETED_LINK) and 403
for a private subreddit. ``posts`` lists what was created, oldest first.
"""

from __future__ import annotations

import base64
import itertools
from typing import Any

from tests.fakes.server import FakeServer, Recorded


class FakeReddit(FakeServer):
    def __init__(self, client_id: str, secret: str, username: str, password: str) -> None:
        super().__init__()
        self.client_id, self.secret, self.username, self.password = client_id, secret, username, password
        self.ids = itertools.count(1000)
        self.tokens: set[str] = set()
        self.submissions: set[str] = {"abc123"}
        self.comments: set[str] = {"cmt456"}
        self.forbidden: set[str] = {"private_club"}
        self.flairs: set[str] = {"flair-1"}
        self.rate_limited = 0
        self.posts: list[dict] = []

    def reset(self) -> None:
        super().reset()
        self.rate_limited = 0
        with self.lock:
            self.posts.clear()

    def _json_error(self, code: str, message: str, field: str) -> tuple[int, Any, None]:
        return 200, {"json": {"errors": [[code, message, field]]}}, None

    def answer(self, request: Recorded) -> tuple[int, Any, dict | None]:
        path = request.path.rstrip("/")
        if path == "/api/v1/access_token":
            expected = base64.b64encode(f"{self.client_id}:{self.secret}".encode()).decode()
            if request.headers.get("authorization") != f"Basic {expected}":
                return 401, {"message": "Unauthorized", "error": 401}, None
            if request.data.get("username") != self.username or request.data.get("password") != self.password:
                return 200, {"error": "invalid_grant"}, None
            token = f"tok{next(self.ids)}"
            self.tokens.add(token)
            return 200, {"access_token": token, "token_type": "bearer", "expires_in": 3600, "scope": "*"}, None
        if request.headers.get("authorization", "").removeprefix("bearer ") not in self.tokens:
            return 401, {"message": "Unauthorized", "error": 401}, None
        if request.method == "POST" and path in ("/api/submit", "/api/comment"):
            with self.lock:
                limited = self.rate_limited > 0
                self.rate_limited -= 1 if limited else 0
            if limited:
                return self._json_error("RATELIMIT", "Looks like you've been doing that a lot. "
                                        "Take a break for 9 minutes before trying again.", "ratelimit")
        if path == "/api/submit" and request.method == "POST":
            sr = request.data.get("sr", "")
            if sr in self.forbidden:
                return 403, {"reason": "private", "message": "Forbidden", "error": 403}, None
            flair = request.data.get("flair_id")
            if flair and flair not in self.flairs:
                return self._json_error("BAD_FLAIR_TEMPLATE_ID", "that flair doesn't exist", "flair_id")
            new_id = f"p{next(self.ids)}"
            with self.lock:
                self.submissions.add(new_id)
                self.posts.append({"kind": "submission", "id": new_id, "sr": sr, "title": request.data.get("title"),
                                   "text": request.data.get("text"), "flair_id": flair})
            return 200, {"json": {"errors": [], "data": {
                "url": f"{self.url}/r/{sr}/comments/{new_id}/", "id": f"t3_{new_id}", "name": f"t3_{new_id}"}}}, None
        if path == "/api/comment" and request.method == "POST":
            kind, _, parent = request.data.get("thing_id", "").partition("_")
            if kind == "t1" and parent not in self.comments:
                return self._json_error("DELETED_COMMENT", "that comment has been deleted", "parent")
            if kind == "t3" and parent not in self.submissions:
                return self._json_error("DELETED_LINK", "the link you are commenting on has been deleted", "parent")
            new_id = f"c{next(self.ids)}"
            with self.lock:
                self.comments.add(new_id)
                self.posts.append({"kind": "comment", "id": new_id, "parent": f"{kind}_{parent}",
                                   "text": request.data.get("text")})
            return 200, {"json": {"errors": [], "data": {"things": [{"kind": "t1", "data": {
                "id": new_id, "name": f"t1_{new_id}", "body": request.data.get("text"),
                "parent_id": f"{kind}_{parent}", "permalink": f"/r/x/comments/{parent}/_/{new_id}/"}}]}}}, None
        return 404, {"message": "Not Found", "error": 404}, None
