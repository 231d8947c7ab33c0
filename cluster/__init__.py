"""Launching seer: local multi-process runs (torchrun) and Slurm jobs (submitit)."""
