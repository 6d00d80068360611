"""facepipe: a DVC-staged, reproducible pipeline for face verification research.

Each stage lives in its own module and is a plain function; ``python -m pipeline``
is a thin typer CLI over them, and ``dvc.yaml`` wires the CLI commands together.
"""

__version__ = "0.1.0"
