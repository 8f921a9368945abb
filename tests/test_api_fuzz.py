"""Every operation of `/api/v1/openapi.json`, called with generated input (schemathesis) as each
role's user: none answers a server error. Bounded (a few examples an operation and role), in
`make test-slow`: it keeps every new endpoint free of 500s."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.default_backend("sqlite")]

ROLES = ("insurer_a", "provider1", "office1", "reviewer1", "auditor1", "operator1")
# ending the caller's sessions would turn every later call into a 401
SESSION_ENDERS = {"/api/v1/auth/logout"}
EXAMPLES = 5          # generated inputs an operation, each sent as every role


def test_no_operation_answers_a_server_error(app, auth):
    schema = schemathesis.openapi.from_asgi("/api/v1/openapi.json", app)
    headers = {who: auth(who) for who in ROLES}
    failures: list[tuple] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path in SESSION_ENDERS:
            continue
        operations += 1

        @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:  # noqa: ANN001
            for who in ROLES:
                case.headers = {**{k: v for k, v in (case.headers or {}).items()
                                   if k.lower() not in ("authorization", "x-api-key")}, **headers[who]}
                response = case.call()
                if response.status_code >= 500:
                    failures.append((who, case.method, case.formatted_path, case.query, response.status_code,
                                     response.text[:200]))

        check()
    assert operations > 40
    assert failures == [], failures[:10]
