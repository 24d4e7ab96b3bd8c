"""kubetrain control plane."""

from importlib.metadata import version

#: The installed distribution's version (pyproject.toml is its one source).
__version__ = version("kubetrain")
