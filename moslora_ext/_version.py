"""The installed distribution's version (``moslora_ext.__version__``), for the records the package writes."""

from importlib import metadata

try:
    __version__ = metadata.version("moslora_ext")
except metadata.PackageNotFoundError:  # pragma: no cover - built in place, not installed
    __version__ = "unknown"
