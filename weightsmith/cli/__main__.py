"""`python -m weightsmith.cli ARGS`: the same as the `weightsmith` console script."""

from weightsmith.cli import app

app()
