"""Hausmeister client modules."""
