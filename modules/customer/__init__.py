"""The ad-hoc customer module."""
