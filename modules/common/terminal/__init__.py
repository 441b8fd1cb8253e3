"""The CLI front-end over the session core: options, terminal consent questions, piping a session
to standard I/O, Ctrl+C as emergency stop."""
