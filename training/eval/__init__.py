"""Evaluation: metrics over image arrays and folders, fixed benchmark sets, report tables (no Dagster here)."""
