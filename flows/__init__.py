"""Prefect flows composing the tasks, and the command-line entry point."""
