"""What a job leaves behind: the resumable store, progress and summary, comparison and HTML report."""
