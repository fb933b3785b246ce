"""CLI subcommands: one module each, exposing ``register(subparsers)``; ``rigface.cli`` wires them."""

# Order is the order `rigface --help` lists them.
COMMANDS = ("stack", "prepare", "shards", "train", "edit", "evaluate")
