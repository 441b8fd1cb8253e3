"""The modules' ``--server-config FILE``: every unusable file is one line naming the file, the
problem and the fix, exit 2 (the server's own config has the same rule, see test_config)."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from modules.common.link.enrollment import EnrollmentFailed, ServerConfigUnusable, read_server_config

from .fixtures_server import run_cli

FP = "AB:" * 31 + "AB"


@pytest.mark.parametrize("kind, fragment", [
    ("latin-1", "is not UTF-8 text (byte 0xe4 at offset"),
    ("binary", "is not UTF-8 text"),
    ("folder", "cannot be read: it is a folder"),
    ("missing", "cannot be read: no such file or directory"),
    ("list", "needs the keys server and ca_fingerprint"),
    ("garbage", "is neither JSON nor TOML"),
])
@pytest.mark.parametrize("module, args", [
    ("customer", ["check"]), ("supporter", ["enroll", "--user", "alice", "--home", "{home}"])])
def test_unusable_server_config_is_one_line_and_exit_2(tmp_path, module, args, kind, fragment):
    path = tmp_path / "customer.toml"
    if kind == "latin-1":
        path.write_bytes(f"server = 'https://m\u00e4rz.lan:8443'\nca_fingerprint = '{FP}'\n"
                         .encode("latin-1"))
    elif kind == "binary":
        path.write_bytes(bytes(range(128, 256)))
    elif kind == "folder":
        path.mkdir()
    elif kind == "list":
        path.write_text('{"server": ["https://h.lan"], "ca_fingerprint": 5}')
    elif kind == "garbage":
        path.write_text("server = = 1\n")
    args = [a.format(home=tmp_path / "home") for a in args]
    result = run_cli(module, *args, "--server-config", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"hausmeister-{module}: error: server config {path} ")
    assert fragment in lines[0] and "--server-config" in lines[0], lines[0]


def test_good_server_config_in_toml_and_json(tmp_path):
    toml = tmp_path / "a.toml"
    toml.write_bytes(b"\xef\xbb\xbfserver = 'https://h.lan:8443'\nca_fingerprint = '" + FP.encode()
                     + b"'\n")
    assert read_server_config(str(toml)) == ("https://h.lan:8443", FP)
    js = tmp_path / "a.json"
    js.write_text('{"server": "https://h.lan:8443", "ca_fingerprint": "%s"}' % FP)
    assert read_server_config(str(js)) == ("https://h.lan:8443", FP)


def test_pipe_is_refused_without_waiting(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    error = outcome_of_reading_a_fifo(fifo, lambda path: read_server_config(str(path)))
    assert isinstance(error, ServerConfigUnusable) and "not a regular file" in str(error), error


def outcome_of_reading_a_fifo(fifo, read) -> BaseException | object:
    """``read(fifo)``'s result or exception; a reader that waits for a writer (what a plain
    open() of a FIFO does) is released after 10 s and reported as hanging."""
    import threading
    result: list = []

    def run():
        try:
            result.append(read(fifo))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # the waiting reader gets EOF
        thread.join(10)
        raise AssertionError(f"reading {fifo} waited for a writer instead of refusing it")
    return result[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=200),
                 st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=10)),
                              lambda inner: st.lists(inner, max_size=3)
                              | st.dictionaries(st.sampled_from(["server", "ca_fingerprint", "x"]),
                                                inner, max_size=3),
                              max_leaves=6).map(lambda v: __import__("json").dumps(v).encode())))
def test_any_server_config_bytes_give_a_pair_or_one_line_error(tmp_path, content):
    """Fuzz target: the module's reader of a downloaded server config."""
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    try:
        server, fp = read_server_config(str(path))
    except EnrollmentFailed as exc:
        assert isinstance(exc, ServerConfigUnusable)
        message = str(exc)
        assert message.startswith(f"server config {path} ") and "\n" not in message, message
        return
    assert isinstance(server, str) and isinstance(fp, str)
