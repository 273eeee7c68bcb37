"""Figures and tables drawn from the MLflow store (see analysis/README.md)."""
