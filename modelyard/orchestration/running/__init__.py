"""Running a job: the JobRunner, one wave of actors at a time, and the per-model work sources."""
