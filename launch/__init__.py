"""Command-line entry points and local-cluster launchers."""
