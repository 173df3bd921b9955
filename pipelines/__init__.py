"""Orchestration only: run directories, the stage DAG with skip-if-done, local/SLURM schedulers, the report."""
