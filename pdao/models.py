"""Every table of pdao, for the migrations and the model checks: the one module that imports the
models of every layer (the kernel itself knows none above it)."""

from __future__ import annotations


def import_all_models() -> None:
    """Import every module that defines tables, so SQLModel.metadata is complete."""
    import catalog.models  # noqa: F401
    import pdao.kernel.audit  # noqa: F401
    import pdao.kernel.identity.models  # noqa: F401
    import policies.models  # noqa: F401
    import sandbox.budgets.ledger  # noqa: F401
    import sandbox.results.models  # noqa: F401
    import sandbox.scenes.models  # noqa: F401
    import sandbox.uploads.models  # noqa: F401
