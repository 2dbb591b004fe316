"""`python -m latentgen`: the same CLI as the `latentgen` script."""

from latentgen.cli import app

app()
