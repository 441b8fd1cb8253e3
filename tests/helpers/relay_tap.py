"""A real relay process (``hausmeister-server run --role relay``) that also writes every byte
it relays to a capture file: what the relay — or whoever controls it — could see.

Usage: python -m tests.helpers.relay_tap CAPTURE_FILE -c CONFIG run --role relay ...
"""

import sys

from server.relay import core, record_splice


def main() -> int:
    capture = open(sys.argv[1], "ab", buffering=0)
    original = core.RelayLeg.data_received

    def tapped(self, data: bytes) -> None:
        capture.write(data)
        original(self, data)
    core.RelayLeg.data_received = tapped
    record_splice.observer = capture.write  # the fast path of paired legs
    from server.cli import main as server_main
    return server_main(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
