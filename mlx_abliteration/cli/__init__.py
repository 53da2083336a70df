"""``mlx-abliterate``: one module per subcommand (a parser and ``main``), thin over the pipeline."""
