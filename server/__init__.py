"""The Hausmeister private server: CA, database, enrollment, module port, web plane."""

__version__ = "0.1.0"
