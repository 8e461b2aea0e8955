"""Training many users' modules at once: the per-slot optimizer, the trainer, and resumable jobs."""
