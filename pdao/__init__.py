"""pdao core: settings, metadata database, errors, identities, audit, command line."""

__version__ = "0.1.0"
