"""Benchmarks run by `swarm-bench <name>`; each module: HELP, add_arguments(parser), run(args)."""
