"""The TLS 1.2 cipher suites of the module port: what the server accepts and what the modules
offer (ECDHE with AES-GCM or ChaCha20-Poly1305 only).  TLS 1.3 suites are OpenSSL's defaults on
both sides.

Why the modules offer no more than this: the server keeps the list a client offered for as long
as the connection lives, and Twisted's default offer of 42 suites cost ~670 bytes per idle host
on the server (bench/README.md, issue 14) for suites it would never choose.
"""

CIPHERS_TLS12 = ("ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-GCM-SHA256:"
                 "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-AES256-GCM-SHA384:"
                 "ECDHE-RSA-AES128-GCM-SHA256")
