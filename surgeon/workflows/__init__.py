"""Workflows: read -> compute -> write, each returning a report object."""
