"""Data: sample records, cohorts (queries over samples), the streaming loader, whole datasets."""
