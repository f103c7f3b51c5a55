"""The client subcommands of the ``ringblob`` CLI, one module each.

Each module provides ``add_arguments(parser)`` and ``run(args) -> int`` and is
registered in :data:`ringblob.cli.COMMANDS`. Shared pieces (``--socket``,
``--hex``, key parsing, connecting, the progress bar) live in
:mod:`ringblob.commands._common`.
"""
