"""The `malaria-edge` command: on top of edge (runtime), train, export and benchmarks; nothing imports it."""
