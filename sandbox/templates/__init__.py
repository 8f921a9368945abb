"""Analysis templates: the library and how one runs on DuckDB (`library`), and runs of them joined
with a tenant's upload (`runs`)."""
