"""Evaluation: batched cached generation, judges, tasks, metrics and reports."""
