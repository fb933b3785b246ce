"""The job commands (`rigface prepare`, `train`, `evaluate`): they drive Ray jobs, so they live above rigface.

Each module exposes ``register(subparsers)``, as rigface's own commands do; pyproject.toml lists them in the
``rigface.commands`` entry-point group, which is how ``rigface.cli`` finds them without importing pipelines.
"""
