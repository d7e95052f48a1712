"""Jobs: the project's job queue (submission, leased claims, progress, outcomes)."""
