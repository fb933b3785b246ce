"""rigface's own CLI subcommands (those that need no Ray): one module each, exposing ``register(subparsers)``.

Every subcommand, these and the job commands in ``pipelines.commands``, is declared in pyproject.toml's
``rigface.commands`` entry-point group; ``rigface.cli`` builds the one parser from that group.
"""
