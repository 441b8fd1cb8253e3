"""Session recordings on the server: keys, storage (folder or S3), the upload receiver, the
policy, export to MP4 and the ``recording`` CLI.  The recordings themselves are written and
encrypted by the module that shows the screen (``protocol.recording``); the server stores them,
anchors their hash in the session protocol and, holding the operator's recording key, can
export them."""
