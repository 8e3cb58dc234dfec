"""Commands of the ``omnisage`` console script, one module per group of commands, each registered on the
``omnisage_pipeline.cli.main`` group with ``main.add_command``. They import their heavy modules lazily so
that ``omnisage --help`` stays fast."""
