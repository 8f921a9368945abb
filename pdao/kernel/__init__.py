"""The kernel: settings, the database and its migrations runner, errors with their codes, identities
with organizations, the audit chain. It imports nothing of the project above it."""
