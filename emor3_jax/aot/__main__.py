"""`python -m emor3_jax.aot --config=...`: see emor3_jax/aot/__init__.py."""
import sys

from emor3_jax.aot.cli import cli

sys.exit(cli(sys.argv))
