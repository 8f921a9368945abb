"""A Python client for the pdao API: submit a query, wait for it, get a pandas DataFrame.

    from pdao.client import Client

    c = Client.login("http://127.0.0.1:8000", "insurer_a", "pdao-demo")
    df = c.query(12, "SELECT district, COUNT(*) AS n FROM health.outpatient_visit GROUP BY district")
    df.attrs["noise"]["n"]["error95"]          # the 95% error bound of every noisy count

A dev query (the default) runs at once on the synthetic twin and spends no ε; its DataFrame says so
(`df.attrs["synthetic"] is True`). A prod query runs on the real data in a worker, spends ε, and its
cells stay inside until export review releases them: `query(..., mode="prod")` raises `ResultHeld`
(with the query and result ids) once the answer is stored; `frame(result_id)` fetches it after release.

Every error the client raises is a `PdaoClientError` carrying the server's stable `code` and its
message in English and Chinese (`message`, `message_zh`); HTTP errors also carry the `status`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import httpx

try:  # optional: a nicer progress bar when it is installed
    from tqdm.auto import tqdm
except Exception:  # noqa: BLE001 - any import failure means "no tqdm"
    tqdm = None

API_PREFIX = "/api/v1"
DEFAULT_TIMEOUT = 30.0
FINAL_STATUSES = frozenset({"held", "done", "released", "rejected", "failed", "cancelled", "denied"})
FORMATS = ("csv", "parquet", "json")

__all__ = ["Client", "PdaoClientError", "QueryFailed", "ResultHeld", "QueryTimeout", "FINAL_STATUSES"]


# ---------------------------------------------------------------------------------------------
# Errors


class PdaoClientError(Exception):
    """Anything the client raises. `status` is the HTTP status of a refused request (0 when the
    server could not be reached, None when the failure is a query's own outcome); `code` is the
    server's stable error code; `message` / `message_zh` its words in English and Chinese."""

    def __init__(self, status: int | None, code: str, message: str, message_zh: str = "",
                 details: Any = None, *, request_id: str | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.message_zh = message_zh
        self.details = details
        self.request_id = request_id
        super().__init__(self._text())

    def _text(self) -> str:
        head = f"{self.status} {self.code}" if self.status is not None else self.code
        text = f"{head}: {self.message}"
        if self.message_zh:
            text += f" / {self.message_zh}"
        return text

    @classmethod
    def from_response(cls, response: httpx.Response) -> PdaoClientError:
        rid = response.headers.get("x-request-id")
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, Mapping) and "code" in body:
            return cls(response.status_code, str(body["code"]), str(body.get("message", "")),
                       str(body.get("message_zh", "") or ""), body.get("details"), request_id=rid)
        text = response.text.strip()[:300] or response.reason_phrase
        return cls(response.status_code, "http_error", f"HTTP {response.status_code}: {text}",
                   f"HTTP 错误 {response.status_code}", request_id=rid)


class QueryFailed(PdaoClientError):
    """The query ended without an answer: failed, cancelled, denied, or its result was rejected
    in export review. `query_status` is that final status; `query` the server's query record."""

    def __init__(self, query: Mapping[str, Any]) -> None:
        self.query = dict(query)
        self.query_id = query.get("id")
        self.result_id = query.get("result_id")
        self.query_status = query.get("status")
        err = query.get("error") or {}
        code = err.get("code") or f"query_{self.query_status}"
        message = err.get("message") or f"Query {self.query_id} ended as {self.query_status}."
        message_zh = err.get("message_zh") or f"查询 {self.query_id} 的最终状态为 {self.query_status}。"
        super().__init__(None, code, message, message_zh)


class ResultHeld(PdaoClientError):
    """A prod answer exists but is held for export review: no cells leave until a reviewer releases
    it. Keep `query_id` / `result_id`; once released, `Client.frame(result_id)` returns the DataFrame."""

    def __init__(self, query: Mapping[str, Any], result: Mapping[str, Any] | None = None) -> None:
        self.query = dict(query)
        self.result = dict(result) if result is not None else None
        self.query_id = query.get("id")
        self.result_id = query.get("result_id") if result is None else result.get("id")
        self.query_status = query.get("status")
        super().__init__(
            None, "result_held",
            f"Query {self.query_id} finished; its result {self.result_id} awaits export review and has no "
            f"visible cells yet. Once released, fetch it with Client.frame({self.result_id}).",
            f"查询 {self.query_id} 已完成，结果 {self.result_id} 正在等待出域审核，暂不可查看数据；"
            f"放行后可用 Client.frame({self.result_id}) 获取。")


class QueryTimeout(PdaoClientError):
    """`wait` gave up before the query reached a final status; the query keeps running."""

    def __init__(self, query: Mapping[str, Any], seconds: float) -> None:
        self.query = dict(query)
        self.query_id = query.get("id")
        self.query_status = query.get("status")
        super().__init__(
            None, "wait_timeout",
            f"Query {self.query_id} is still {self.query_status} after {seconds:g} s; it keeps running "
            f"(poll it with Client.status({self.query_id}) or Client.wait({self.query_id})).",
            f"查询 {self.query_id} 在 {seconds:g} 秒后仍为 {self.query_status} 状态，查询仍在继续执行。")


# ---------------------------------------------------------------------------------------------
# Progress display


class _Progress:
    """A tqdm bar when tqdm is importable, else one rewritten line on stderr; nothing if disabled."""

    def __init__(self, query_id: Any, enabled: bool) -> None:
        self.query_id = query_id
        self.enabled = enabled
        self.bar: Any = None
        self.last = ""

    def update(self, status: str, fraction: float) -> None:
        if not self.enabled:
            return
        pct = max(0.0, min(float(fraction or 0.0), 1.0)) * 100
        if tqdm is not None:
            if self.bar is None:
                self.bar = tqdm(total=100, desc=f"query {self.query_id}", unit="%",
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} {postfix}")
            self.bar.n = round(pct, 1)
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.refresh()
            return
        line = f"query {self.query_id}: {status} {pct:3.0f}%"
        if line != self.last:
            sys.stderr.write("\r" + line.ljust(len(self.last)))
            sys.stderr.flush()
            self.last = line

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.last:
            sys.stderr.write("\n")
            sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# The client


class Client:
    """A connection to a pdao server as one user (a bearer token) or one API key.

    `url` is the server's address (`http://host:8000`; `/api/v1` is added when missing).
    `timeout` is the time allowed for each HTTP request, in seconds."""

    def __init__(self, url: str, token: str | None = None, *, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        base = url.rstrip("/")
        if not base.endswith(API_PREFIX):
            base += API_PREFIX
        self.url = base
        headers = {"Accept": "application/json", "User-Agent": "pdao-client"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if api_key:
            headers["X-API-Key"] = api_key
        self.token = token
        self.username: str | None = None
        self.role: str | None = None
        self.org: str | None = None
        self.expires_at: str | None = None
        self._http = httpx.Client(base_url=base, headers=headers, timeout=timeout)

    @classmethod
    def login(cls, url: str, username: str, password: str, *, timeout: float = DEFAULT_TIMEOUT) -> Client:
        """Log in with a username and password (the OAuth2 password form) and return a client
        holding the bearer token."""
        anonymous = cls(url, timeout=timeout)
        try:
            body = anonymous._request("POST", "/auth/token", data={"username": username, "password": password})
        finally:
            anonymous.close()
        c = cls(url, body["access_token"], timeout=timeout)
        c.username, c.role, c.org, c.expires_at = username, body.get("role"), body.get("org"), body.get("expires_at")
        return c

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        who = f" {self.username}" if self.username else ""
        return f"<pdao Client{who} {self.url}>"

    def _send(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TimeoutException as e:
            raise PdaoClientError(0, "timeout", f"{method} {self.url}{path} timed out: {e}",
                                  f"请求 {self.url}{path} 超时。") from e
        except httpx.TransportError as e:
            raise PdaoClientError(0, "unreachable", f"Cannot reach {self.url}: {e}",
                                  f"无法连接服务器 {self.url}。") from e
        if not r.is_success:
            raise PdaoClientError.from_response(r)
        return r

    def _request(self, method: str, path: str, **kw: Any) -> Any:
        return self._send(method, path, **kw).json()

    # -- who am I -----------------------------------------------------------------------------

    def me(self) -> dict[str, Any]:
        """The caller: username, role, organization."""
        return self._request("GET", "/me")

    # -- API keys -----------------------------------------------------------------------------

    def claim_api_key(self, grant_id: int, password: str) -> str:
        """Claim an API key an operator granted you, with your password typed again, and return it
        (shown this once: keep it safe, send it as `Client(url, api_key=...)`). Needs a client from
        `Client.login` as the key's owner, not one holding an API key. A wrong password raises
        403 wrong_password and counts towards the login lockout."""
        return self._request("POST", f"/api-keys/{int(grant_id)}/claim", json={"password": password})["key"]

    def api_keys(self) -> list[dict[str, Any]]:
        """Your API keys' metadata (an operator: everyone's): status pending, active, expired,
        lapsed or revoked; never a key."""
        return self._request("GET", "/api-keys")

    def revoke_api_key(self, key_id: int) -> dict[str, Any]:
        """Revoke one of your API keys (or a pending grant); it stops working at once."""
        return self._request("DELETE", f"/api-keys/{int(key_id)}")

    # -- scenes -------------------------------------------------------------------------------

    def scene(self, scene: int) -> dict[str, Any]:
        return self._request("GET", f"/scenes/{int(scene)}")

    def budget(self, scene: int) -> dict[str, Any]:
        """The scene's privacy budget: `epsilon`, `epsilon_spent` (reserved ε counts as spent) and
        `epsilon_left`."""
        return self.scene(scene)["budget"]

    # -- queries ------------------------------------------------------------------------------

    @staticmethod
    def _body(sql: str, mode: str, epsilon: float | None) -> dict[str, Any]:
        if mode not in ("dev", "prod"):
            raise ValueError(f"mode must be 'dev' or 'prod', not {mode!r}")
        body: dict[str, Any] = {"sql": sql, "mode": mode}
        if epsilon is not None:
            body["epsilon"] = float(epsilon)
        return body

    def preview(self, scene: int, sql: str, mode: Literal["dev", "prod"] = "prod",
                epsilon: float | None = None) -> dict[str, Any]:
        """The ε the query would cost and each aggregate's expected error (95%); runs and spends nothing."""
        return self._request("POST", f"/scenes/{int(scene)}/queries/preview", json=self._body(sql, mode, epsilon))

    def submit(self, scene: int, sql: str, mode: Literal["dev", "prod"] = "dev",
               epsilon: float | None = None) -> dict[str, Any]:
        """Submit a query and return its record at once (a prod query's ε is reserved now)."""
        return self._request("POST", f"/scenes/{int(scene)}/queries", json=self._body(sql, mode, epsilon))

    def status(self, query_id: int) -> dict[str, Any]:
        """The query's record: `status`, `progress` (0..1), `result_id`, `error`, ε reserved and spent."""
        return self._request("GET", f"/queries/{int(query_id)}")

    def cancel(self, query_id: int) -> dict[str, Any]:
        """Cancel a queued query (at once, ε refunded) or ask a running one to stop."""
        return self._request("POST", f"/queries/{int(query_id)}/cancel")

    def queries(self, scene: int | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """The caller's organization's queries, newest first (of one scene, or all)."""
        path = "/queries" if scene is None else f"/scenes/{int(scene)}/queries"
        return self._request("GET", path, params={"limit": limit})

    def wait(self, query_id: int, *, progress: bool = True, poll: float = 0.5,
             timeout: float | None = None) -> dict[str, Any]:
        """Poll until the query's status is final (held, done, released, rejected, failed, cancelled)
        and return its record; `QueryTimeout` after `timeout` seconds (the query keeps running)."""
        return self._wait(self.status(query_id), progress=progress, poll=poll, timeout=timeout)

    def _wait(self, q: dict[str, Any], *, progress: bool, poll: float, timeout: float | None) -> dict[str, Any]:
        if q.get("status") in FINAL_STATUSES:
            return q
        started = time.monotonic()
        bar = _Progress(q.get("id"), progress)
        try:
            while q.get("status") not in FINAL_STATUSES:
                bar.update(q.get("status", "?"), q.get("progress") or 0.0)
                if timeout is not None and time.monotonic() - started >= timeout:
                    raise QueryTimeout(q, timeout)
                time.sleep(max(poll, 0.01))
                q = self.status(q["id"])
            bar.update(q["status"], 1.0 if q["status"] in ("held", "done", "released") else q.get("progress") or 0.0)
        finally:
            bar.close()
        return q

    def query(self, scene: int, sql: str, mode: Literal["dev", "prod"] = "dev", epsilon: float | None = None, *,
              wait: bool = True, progress: bool = True, poll: float = 0.5, timeout: float | None = None) -> Any:
        """Run a query and return its answer as a pandas DataFrame.

        `df.attrs` holds: query_id, result_id, scene_id, mode, status, synthetic, kind, noise (per
        aggregate: scale, error95, …), epsilon (what the noise is calibrated to), epsilon_spent (what the
        scene's budget was charged: 0 for a synthetic answer), notes, sha256, and for a dev answer notice
        and notice_zh.

        dev (the default): answered at once on the synthetic twin, no ε spent, `attrs["synthetic"]`.
        prod: waits for the worker (a progress bar while it runs), then raises `ResultHeld` — the
        answer is stored but awaits export review — or returns the DataFrame if it was already released.
        A failed, cancelled or rejected query raises `QueryFailed` with the server's code and messages.
        With `wait=False` the query's record (a dict) is returned right after submission; `fetch(id)`
        gets the answer later."""
        q = self.submit(scene, sql, mode, epsilon)
        if not wait:
            return q
        q = self._wait(q, progress=progress, poll=poll, timeout=timeout)
        return self._frame_of_query(q)

    def fetch(self, query_id: int, *, progress: bool = True, poll: float = 0.5, timeout: float | None = None) -> Any:
        """The answer of a query submitted earlier (`query(..., wait=False)`): waits like `query`, then
        returns its DataFrame or raises `ResultHeld` / `QueryFailed`."""
        return self._frame_of_query(self.wait(query_id, progress=progress, poll=poll, timeout=timeout))

    def _frame_of_query(self, q: Mapping[str, Any]) -> Any:
        if q["status"] in ("held", "done", "released") and q.get("result_id") is not None:
            res = self.result(q["result_id"])
            if not res.get("cells_visible"):
                raise ResultHeld(q, res)
            return self._to_frame(res, q)
        raise QueryFailed(q)

    # -- results ------------------------------------------------------------------------------

    def result(self, result_id: int) -> dict[str, Any]:
        """The result's metadata and noise report; `rows` only when the cells are visible to the caller
        (the tenant's own dev answers, or once export review released them)."""
        res = self._request("GET", f"/results/{int(result_id)}", params={"limit": 10_000})
        while res.get("rows") is not None and res.get("next_offset") is not None:   # every page
            page = self._request("GET", f"/results/{int(result_id)}",
                                 params={"limit": 10_000, "offset": res["next_offset"]})
            res["rows"] += page["rows"]
            res["next_offset"] = page["next_offset"]
        return res

    def frame(self, result_id: int) -> Any:
        """A result as a DataFrame (`ResultHeld` while it awaits export review)."""
        res = self.result(result_id)
        q = self.status(res["query_id"])
        if not res.get("cells_visible"):
            raise ResultHeld(q, res)
        return self._to_frame(res, q)

    def download(self, result_id: int, path: str | PathLike[str] | None = None,
                 format: Literal["csv", "parquet", "json"] = "csv") -> bytes | Path:
        """The result as a file: its bytes, or written to `path` (a directory gets
        `result-{id}.{format}`) and that path returned. Only released results (and your own dev
        answers) can be downloaded. Each download is an export with its own id: a CSV starts with a
        `# pdao export <id> fingerprint <fp> …` line (and a synthetic answer with a second `#`
        notice line) before the header — read it with `pandas.read_csv(f, comment="#")` or skip
        the leading `#` lines."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
        data = self._send("GET", f"/results/{int(result_id)}/download", params={"format": format}).content
        if path is None:
            return data
        target = Path(path)
        if target.is_dir():
            target = target / f"result-{int(result_id)}.{format}"
        target.write_bytes(data)
        return target

    # -- scenes: apply (applicants), review (the office) ----------------------------------------------

    def create_scene(self, application: Mapping[str, Any]) -> dict[str, Any]:
        """Draft a scene application (fields of API.md: title, purpose, scene_type, legal_basis,
        emergency_plan, valid_from/to, budgets, items, and optionally templates)."""
        return self._request("POST", "/scenes", json=dict(application))

    def submit_scene(self, scene: int) -> dict[str, Any]:
        return self._request("POST", f"/scenes/{int(scene)}/submit")

    def review_scene(self, scene: int, decision: Literal["approve", "reject", "return"], comment: str = "",
                     struck_items: list[int] | None = None) -> dict[str, Any]:
        """The office's opinion on a submitted scene."""
        return self._request("POST", f"/scenes/{int(scene)}/reviews",
                             json={"decision": decision, "comment": comment, "struck_items": struck_items or []})

    # -- the tenant's own data and approved templates ------------------------------------------------

    def upload(self, file: str | PathLike[str] | bytes, schema: Mapping[str, Any], *, note: str = "",
               filename: str | None = None) -> dict[str, Any]:
        """Upload the company's own table (CSV or Parquet) with its declared schema (docs/uploads.md):
        checked, scanned for undeclared personal data, stored as a new immutable version."""
        import json

        if isinstance(file, bytes):
            data, name = file, filename or "upload.csv"
        else:
            data, name = Path(file).read_bytes(), filename or Path(file).name
        form = {"schema": json.dumps(dict(schema), ensure_ascii=False)}
        if note:
            form["note"] = note
        return self._request("POST", "/uploads", data=form, files={"file": (name, data)})

    def uploads(self) -> list[dict[str, Any]]:
        return self._request("GET", "/uploads")

    def run_template(self, scene: int, template: str, upload: str, params: Mapping[str, Any] | None = None,
                     mode: Literal["dev", "prod"] = "prod") -> dict[str, Any]:
        """Run an approved analysis template of the scene on your upload. prod: the answer waits for
        export review (`frame(result_id)` once released); dev: on the synthetic twin, at once."""
        return self._request("POST", f"/scenes/{int(scene)}/templates/{template}/runs",
                             json={"upload": upload, "params": dict(params or {}), "mode": mode})

    # -- export review, lineage and trace (reviewers, the office and auditors, signed in in person)

    def review_queue(self, limit: int = 100) -> list[dict[str, Any]]:
        """Held results waiting for you (reviewers)."""
        return self._request("GET", "/reviews/queue", params={"limit": limit})

    def review(self, result_id: int, decision: Literal["release", "reject"], reason: str, *,
               override: bool = False) -> dict[str, Any]:
        """Release or reject a held result, with a reason (reviewers). A result with a failing check
        is released only by two reviewers each releasing with `override=True` and a reason."""
        body: dict[str, Any] = {"decision": decision, "reason": reason}
        if override:
            body["override"] = True
        return self._request("POST", f"/results/{int(result_id)}/review", json=body)

    def lineage(self, result_id: int) -> dict[str, Any]:
        """Result → query → scene → authorization → dataset versions, reviews and exports."""
        return self._request("GET", f"/results/{int(result_id)}/lineage")

    def trace(self, file: str | PathLike[str] | bytes, filename: str | None = None) -> dict[str, Any]:
        """Who and what is behind a file found outside (auditors, the office)."""
        if isinstance(file, bytes):
            data, name = file, filename or "found"
        else:
            data, name = Path(file).read_bytes(), filename or Path(file).name
        return self._request("POST", "/trace", files={"file": (name, data)})

    @staticmethod
    def _to_frame(res: Mapping[str, Any], q: Mapping[str, Any]) -> Any:
        import pandas as pd

        columns = res.get("columns") or []
        names = [c["name"] for c in columns]
        df = pd.DataFrame.from_records(res.get("rows") or [], columns=names)
        for c in columns:
            df[c["name"]] = _typed(df[c["name"]], str(c.get("type", "")))
        synthetic = bool(res.get("synthetic"))
        df.attrs.update({
            "query_id": res.get("query_id", q.get("id")), "result_id": res.get("id"), "scene_id": res.get("scene_id"),
            "mode": q.get("mode"), "status": res.get("status"), "synthetic": synthetic, "kind": res.get("kind"),
            "noise": res.get("noise") or {},
            # the ε the noise was calibrated to; a synthetic (dev) answer spends none of the scene's budget
            "epsilon": res.get("epsilon"), "epsilon_spent": res.get("epsilon_spent"),
            "notes": res.get("notes"), "sha256": res.get("sha256"),
        })
        if res.get("notice"):
            df.attrs["notice"], df.attrs["notice_zh"] = res["notice"], res.get("notice_zh")
        return df


def _typed(s: Any, arrow_type: str) -> Any:
    """A column of JSON values back to the dtype its Arrow type names (the dtype a Parquet download
    of the same result reads back as)."""
    import pandas as pd

    t = arrow_type.lower()
    try:
        if t.startswith(("int", "uint")):
            return s.astype("int64") if s.notna().all() else s.astype("float64")
        if t in ("double", "float", "float64", "float32", "halffloat") or t.startswith("decimal"):
            return s.astype("float64")
        if t in ("bool", "boolean"):
            return s.astype("bool") if s.notna().all() else s.astype("object")
        if t.startswith("timestamp"):
            return pd.to_datetime(s)
        if t.startswith("date"):
            return pd.to_datetime(s).dt.date.astype("object")
    except (TypeError, ValueError):
        return s
    return s
