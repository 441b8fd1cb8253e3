"""The supporter module: enrollment, host list, sessions."""
