"""The screen of the showing side: the RFB server, X11 capture, input injection and clipboard."""
