"""Queries: submit, plan, run and store; what a tenant observes of a prod run (outcomes); a running
job's lease and heartbeat."""
