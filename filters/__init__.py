"""The project's own minifilters, one package each (see README.md here)."""
