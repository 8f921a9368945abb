"""A company's own tables: checked, versioned, within quotas, read only for that company."""
