"""The unattended remote-host service."""
