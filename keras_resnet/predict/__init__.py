"""Prediction from a `.keras` file, a run folder or an export, one module per task."""
