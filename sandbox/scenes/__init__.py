"""Scenes: applications with their data lists, the office's review, transitions, and the decision
of whether a scene permits a use."""
