"""The engine: the SQL checker, planning and running on DuckDB, OpenDP privacy, masking and PII
recognizers, and the domain store of immutable snapshots."""
