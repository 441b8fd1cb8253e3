"""The Qt front-ends' shared parts: start-up (display check, qasync + Twisted on one loop),
translations, consent dialogs and the remote-screen widget.  No session logic lives here: the
windows drive ``SessionRunner`` (modules/common/session/session_runner.py) through its commands and
show what its delegate and consent UI report."""
