"""Settings, read once from the environment and passed down explicitly."""

from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    demo_password: str = "pdao-demo"
    token_ttl_minutes: int = 60
    max_upload_bytes: int = 2 * 1024**3
    max_tenant_upload_bytes: int = 200 * 1024**2  # a tenant's own table (POST /uploads)
    # Bounds on a tenant's uploads (docs/uploads.md): data rows in one file, checked before any
    # per-row work; and what one organization's stored versions may hold together.
    upload_max_rows: int = 1_000_000
    tenant_upload_quota_bytes: int = 2048 * 1024**2
    tenant_upload_quota_rows: int = 50_000_000
    # How often and how many at once one organization's uploads are checked (counted in the database
    # before the file is read), and how long one upload's checks and scan may run before refusing.
    upload_rate_per_hour: int = 20
    upload_concurrency: int = 1
    upload_check_seconds: float = 60.0
    login_max_failures: int = 5            # per (name, client address) and lock window
    login_max_failures_per_name: int = 10  # per name across addresses, for addresses it never signed in from
    login_lock_minutes: int = 15
    # Password checks (Argon2id, ~0.35 s CPU and 64 MiB each) are bounded before any is computed
    # (pdao/kernel/identity/throttle.py): per client address per minute, and how many run at once in this
    # process, a login waiting at most `login_hash_wait_seconds` for its turn (then 429 login_busy).
    login_rate_per_minute: int = 30
    login_max_concurrent_hashes: int = 2
    login_hash_wait_seconds: float = 1.0
    # Refused requests that name nobody, per client address and minute (api/refusals.py): audited one
    # by one up to the first number, then counted into one summary event; past the second, answered
    # 429 before they run.
    anonymous_audited_per_minute: int = 30
    anonymous_refusals_per_minute: int = 600
    api_key_claim_days: int = 7        # an API key grant waits this long for its owner to claim it
    scene_approvals_required: int = 2  # distinct office approvers per scene
    scene_max_validity_days: int = 366
    query_lease_seconds: int = 60      # a running query's lease; a worker renews it while it runs
    query_max_attempts: int = 3        # a query whose worker died is retried this often, then failed
    query_time_limit_seconds: float = 600.0     # a prod run is stopped after this (then held, like any failure)
    dev_query_time_limit_seconds: float = 60.0  # a dev run (synthetic twin) is stopped after this
    query_rate_per_minute: int = 60    # queries one tenant (organization) may submit per minute
    read_rows_per_minute: int = 200_000  # rows of result pages and downloads one organization reads a minute
    query_jobs_per_tenant: int = 1     # of one tenant's queued queries, this many run at once
    held_row_answers_per_tenant: int = 20   # prod row answers one organization may have waiting for review
    # Dev answers (synthetic) are kept this many days, then their files go; what one organization's
    # kept dev answers may hold together. (Prod answers are bounded by the rate and the review, not by
    # a quota: their size depends on the data, and a refusal would tell it.)
    dev_answer_days: int = 7
    dev_answer_quota_bytes: int = 1024 * 1024**2
    # A prod run's outcome becomes visible at the end of its timing class: the run's duration rounded
    # up to base × 2^n seconds (sandbox/queries/outcomes.py). 0 turns the padding off (tests only).
    prod_timing_base_seconds: float = 1.0
    # What one company may spend on one dataset across all its scenes, unless the office set its own
    # cap (sandbox/budgets/ledger.py). ε 10 is a scene's maximum budget and 3-5 typical scenes (ε 2-3 each).
    company_dataset_epsilon: float = 10.0
    company_dataset_delta: float = 1e-5
    secret_key_override: str | None = field(default=None, repr=False)
    fingerprint_key_override: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        home = Path(env.get("PDAO_HOME", "./.pdao")).expanduser().resolve()
        url = env.get("PDAO_DATABASE_URL") or f"sqlite:///{home / 'pdao.db'}"
        return cls(
            home=home,
            database_url=normalize_database_url(url),
            demo_password=env.get("PDAO_DEMO_PASSWORD", "pdao-demo"),
            token_ttl_minutes=int(env.get("PDAO_TOKEN_TTL_MINUTES", "60")),
            max_upload_bytes=int(env.get("PDAO_MAX_UPLOAD_MB", "2048")) * 1024**2,
            max_tenant_upload_bytes=int(env.get("PDAO_MAX_TENANT_UPLOAD_MB", "200")) * 1024**2,
            upload_max_rows=int(env.get("PDAO_UPLOAD_MAX_ROWS", "1000000")),
            tenant_upload_quota_bytes=int(env.get("PDAO_TENANT_UPLOAD_QUOTA_MB", "2048")) * 1024**2,
            tenant_upload_quota_rows=int(env.get("PDAO_TENANT_UPLOAD_QUOTA_ROWS", "50000000")),
            upload_rate_per_hour=int(env.get("PDAO_UPLOAD_RATE_PER_HOUR", "20")),
            upload_concurrency=int(env.get("PDAO_UPLOAD_CONCURRENCY", "1")),
            upload_check_seconds=float(env.get("PDAO_UPLOAD_CHECK_SECONDS", "60")),
            secret_key_override=env.get("PDAO_SECRET_KEY") or None,
            fingerprint_key_override=env.get("PDAO_FINGERPRINT_KEY") or None,
            scene_approvals_required=int(env.get("PDAO_SCENE_APPROVALS", "2")),
            scene_max_validity_days=int(env.get("PDAO_SCENE_MAX_VALIDITY_DAYS", "366")),
            query_lease_seconds=int(env.get("PDAO_QUERY_LEASE_SECONDS", "60")),
            query_max_attempts=int(env.get("PDAO_QUERY_MAX_ATTEMPTS", "3")),
            api_key_claim_days=int(env.get("PDAO_API_KEY_CLAIM_DAYS", "7")),
            login_rate_per_minute=int(env.get("PDAO_LOGIN_RATE_PER_MINUTE", "30")),
            login_max_failures_per_name=int(env.get("PDAO_LOGIN_MAX_FAILURES_PER_NAME", "10")),
            login_max_concurrent_hashes=int(env.get("PDAO_LOGIN_CONCURRENT_HASHES", "2")),
            login_hash_wait_seconds=float(env.get("PDAO_LOGIN_HASH_WAIT_SECONDS", "1")),
            anonymous_audited_per_minute=int(env.get("PDAO_ANONYMOUS_AUDITED_PER_MINUTE", "30")),
            anonymous_refusals_per_minute=int(env.get("PDAO_ANONYMOUS_REFUSALS_PER_MINUTE", "600")),
            query_time_limit_seconds=float(env.get("PDAO_QUERY_TIME_LIMIT_SECONDS", "600")),
            dev_query_time_limit_seconds=float(env.get("PDAO_DEV_QUERY_TIME_LIMIT_SECONDS", "60")),
            query_rate_per_minute=int(env.get("PDAO_QUERY_RATE_PER_MINUTE", "60")),
            read_rows_per_minute=int(env.get("PDAO_READ_ROWS_PER_MINUTE", "200000")),
            query_jobs_per_tenant=int(env.get("PDAO_QUERY_JOBS_PER_TENANT", "1")),
            held_row_answers_per_tenant=int(env.get("PDAO_HELD_ROW_ANSWERS_PER_TENANT", "20")),
            dev_answer_days=int(env.get("PDAO_DEV_ANSWER_DAYS", "7")),
            dev_answer_quota_bytes=int(env.get("PDAO_DEV_ANSWER_QUOTA_MB", "1024")) * 1024**2,
            prod_timing_base_seconds=float(env.get("PDAO_PROD_TIMING_BASE_SECONDS", "1")),
            company_dataset_epsilon=float(env.get("PDAO_COMPANY_DATASET_EPSILON", "10")),
            company_dataset_delta=float(env.get("PDAO_COMPANY_DATASET_DELTA", "1e-5")),
        )

    @property
    def domain_dir(self) -> Path:
        """The domain store: immutable Parquet snapshots. Nothing outside the sandbox reads it."""
        return self.home / "domain"

    @property
    def results_dir(self) -> Path:
        """Answers of queries (noisy aggregates, masked rows), kept until export review lets them out."""
        return self.home / "results"

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    def __post_init__(self) -> None:
        if self.scene_approvals_required < 1:
            raise ValueError("PDAO_SCENE_APPROVALS must be at least 1 (default 2)")
        if not (math.isfinite(self.company_dataset_epsilon) and self.company_dataset_epsilon >= 0):
            raise ValueError("PDAO_COMPANY_DATASET_EPSILON must be a finite number, 0 or more (default 10)")
        if not (math.isfinite(self.company_dataset_delta) and self.company_dataset_delta >= 0):
            raise ValueError("PDAO_COMPANY_DATASET_DELTA must be a finite number, 0 or more (default 1e-5)")
        for name, value in (("PDAO_UPLOAD_MAX_ROWS", self.upload_max_rows),
                            ("PDAO_TENANT_UPLOAD_QUOTA_MB", self.tenant_upload_quota_bytes),
                            ("PDAO_TENANT_UPLOAD_QUOTA_ROWS", self.tenant_upload_quota_rows),
                            ("PDAO_LOGIN_RATE_PER_MINUTE", self.login_rate_per_minute),
                            ("PDAO_LOGIN_CONCURRENT_HASHES", self.login_max_concurrent_hashes),
                            ("PDAO_UPLOAD_RATE_PER_HOUR", self.upload_rate_per_hour),
                            ("PDAO_UPLOAD_CONCURRENCY", self.upload_concurrency),
                            ("PDAO_DEV_ANSWER_DAYS", self.dev_answer_days),
                            ("PDAO_READ_ROWS_PER_MINUTE", self.read_rows_per_minute),
                            ("PDAO_ANONYMOUS_AUDITED_PER_MINUTE", self.anonymous_audited_per_minute),
                            ("PDAO_ANONYMOUS_REFUSALS_PER_MINUTE", self.anonymous_refusals_per_minute),
                            ("PDAO_DEV_ANSWER_QUOTA_MB", self.dev_answer_quota_bytes)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1")
        if not (math.isfinite(self.login_hash_wait_seconds) and self.login_hash_wait_seconds >= 0):
            raise ValueError("PDAO_LOGIN_HASH_WAIT_SECONDS must be a finite number, 0 or more (default 1)")
        if not (math.isfinite(self.upload_check_seconds) and self.upload_check_seconds > 0):
            raise ValueError("PDAO_UPLOAD_CHECK_SECONDS must be a finite number above 0 (default 60)")

    def ensure_home(self) -> None:
        """Create the home and its stores, readable by the server's own account only: the home holds
        the domain store, held answers with their exact statistics, and (on SQLite) the metadata
        database with password hashes and the audit log."""
        for d in (self.home, self.domain_dir, self.staging_dir, self.results_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.home.chmod(0o700)

    def sweep_staging(self, older_than_seconds: float = 24 * 3600) -> int:
        """Remove what crashed loads left in staging (a live load is never a day old)."""
        import shutil
        import time

        removed = 0
        cutoff = time.time() - older_than_seconds
        for p in self.staging_dir.glob("*") if self.staging_dir.exists() else ():
            if p.lstat().st_mtime < cutoff:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed += 1
        return removed

    @property
    def secret_key(self) -> str:
        """Token signing key: from PDAO_SECRET_KEY, else a random key kept in the home (0600)
        so that every server process on this home signs alike."""
        if self.secret_key_override:
            if len(self.secret_key_override.encode()) < 32:
                raise ValueError("PDAO_SECRET_KEY must be at least 32 bytes (HS256 wants a key as long as its hash)")
            return self.secret_key_override
        return self._kept_key("secret.key")

    @property
    def fingerprint_key(self) -> str:
        """The key of export stamps and content fingerprints: its own, so that rotating the token key
        never orphans the files already out. PDAO_FINGERPRINT_KEY, else kept in the home (0600);
        back it up with the database — without it no file out there can be traced."""
        if self.fingerprint_key_override:
            if len(self.fingerprint_key_override.encode()) < 32:
                raise ValueError("PDAO_FINGERPRINT_KEY must be at least 32 bytes")
            return self.fingerprint_key_override
        return self._kept_key("fingerprint.key")

    def _kept_key(self, name: str) -> str:
        path = self.home / name
        if not path.exists():
            self.ensure_home()
            # written whole under a temporary name, then linked: a racing process never reads it half-written
            tmp = self.home / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process won the race; read theirs
            finally:
                tmp.unlink(missing_ok=True)
        return path.read_text().strip()


def normalize_database_url(url: str) -> str:
    """Accept the common spellings of a PostgreSQL URL and use the psycopg 3 driver."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url
