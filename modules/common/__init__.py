"""What the supporter, customer and remote-host modules share, grouped by plane: ``link`` (the
server connection), ``session`` (the session core), ``screen`` (RFB server, capture, input), and
the two front-ends ``terminal`` (CLI) and ``qt`` (desktop apps)."""
