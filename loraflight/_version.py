"""The one place the version lives: pyproject.toml reads it from here (setuptools `attr:`)."""

__version__ = "0.4.0"

__all__ = ["__version__"]
