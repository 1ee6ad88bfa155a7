"""The package version, in a leaf module (provenance imports it without the package)."""

__version__ = "0.1.0"
