"""The session core: the end-to-end channel, the multiplexer, consent and rights, file transfer,
the recorder, and the session object (``session_runner``) that the CLI and the apps drive."""
