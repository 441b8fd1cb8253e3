"""One port for browsers and modules (``listen.single_port``, split by ALPN) and modules behind a
real HTTP proxy (Debian's tinyproxy on 127.0.0.1 that allows only CONNECT to that port).

Single port: Chromium gets the console there; a module (ALPN ``hausmeister/1``) is held to the
module port's certificate rules (revoked and foreign certificates refused at the handshake) while
the web plane on the same port stays as lenient as the HTTPS port.  Proxy: enrollment of a
supporter and a host, the host's presence and a full session all through the proxy's tunnels,
and a refusing proxy is one clear line.
"""

from __future__ import annotations

import json
import socket
import ssl

import pytest
import trustme

from tests.fixtures_console import Console
from tests.fixtures_proxy import Tinyproxy
from tests.fixtures_server import (
    ADMIN_PASSWORD, SUPPORTER_PASSWORD, ServerProcess, free_port, run_cli, write_config,
)
from tests.module_process import ModuleProcess
from tests.test_e2e_enrollment import refused_at_handshake

pytestmark = pytest.mark.e2e

NO_ENV_PROXY = {"https_proxy": "", "HTTPS_PROXY": "", "no_proxy": "", "NO_PROXY": ""}


def single_port_server(tmp_path, db_url, extra: str = "") -> tuple[ServerProcess, int]:
    port = free_port()
    data = tmp_path / "data"
    config = write_config(tmp_path / "hausmeister.toml", data, db_url, extra=extra)
    config.write_text(config.read_text().replace("module_port = 0",
                                                 f"module_port = 0\nsingle_port = {port}"))
    srv = ServerProcess(config, data)
    srv.ok("init", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    srv.start()
    assert srv.info["single_port"] == port
    return srv, port


def tls_to(srv: ServerProcess, port: int, alpn: str, cert=None, key=None) -> ssl.SSLSocket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=(srv.cert_dir / "ca.crt").read_text())
    ctx.set_alpn_protocols([alpn])
    if cert:
        ctx.load_cert_chain(cert, key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def get_info(sock: ssl.SSLSocket) -> dict:
    sock.sendall(b"GET /api/v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def enroll_supporter(srv, url: str, home, env=None, proxy_args=()) -> str:
    result = run_cli("supporter", *proxy_args, "enroll", "--server", url, "--ca-fingerprint",
                     srv.fingerprint, "--user", "alice", "--password-stdin", "--home", str(home),
                     stdin=SUPPORTER_PASSWORD + "\n", env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_single_port_serves_browsers_and_holds_modules_to_mutual_tls(tmp_path, db_url, browser):
    srv, port = single_port_server(tmp_path, db_url)
    try:
        single_url = f"https://127.0.0.1:{port}"
        c = Console(browser, single_url)
        try:
            c.login("admin", ADMIN_PASSWORD)
            assert c.page.url == single_url + "/console/hosts"
            c.assert_local_only()
        finally:
            c.close()

        # enrolled over the single port, the module is told to use it for everything
        srv.ok("user", "add", "alice", "--role", "supporter", "--password-stdin",
               stdin=SUPPORTER_PASSWORD + "\n")
        home = tmp_path / "alice"
        enroll_supporter(srv, single_url, home, env=NO_ENV_PROXY)
        settings = json.loads((home / "module.json").read_text())
        assert settings["module_port"] == port
        status = run_cli("supporter", "status", "--home", str(home), env=NO_ENV_PROXY)
        assert status.returncode == 0 and "hausmeister:supporter:alice" in status.stdout
        assert "path:        direct" in status.stdout

        cert, key = home / "cert.pem", home / "key.pem"
        live = tls_to(srv, port, "hausmeister/1", cert, key)
        assert live.selected_alpn_protocol() == "hausmeister/1"
        live.settimeout(0.3)
        with pytest.raises(socket.timeout):
            live.recv(1)  # admitted to the module plane: the server waits for Hello
        web = tls_to(srv, port, "http/1.1")
        assert web.selected_alpn_protocol() == "http/1.1"
        assert get_info(web)["module_port"] == port

        # a foreign certificate: refused on the module plane, as on the module port ...
        foreign = trustme.CA().issue_cert("127.0.0.1")
        foreign.cert_chain_pems[0].write_to_path(str(tmp_path / "foreign.pem"))
        foreign.private_key_pem.write_to_path(str(tmp_path / "foreign.key"))
        assert refused_at_handshake(lambda: tls_to(srv, port, "hausmeister/1",
                                                   tmp_path / "foreign.pem", tmp_path / "foreign.key"))
        # ... and a revoked one too, which also loses its live connection
        srv.ok("cert", "revoke", "hausmeister:supporter:alice", "--reason", "laptop stolen")
        live.settimeout(10)
        try:
            assert live.recv(1) == b""
        except (ssl.SSLError, ConnectionResetError):
            pass
        live.close()
        assert refused_at_handshake(lambda: tls_to(srv, port, "hausmeister/1", cert, key))
        # the web plane on the same port asks for no particular certificate, like the HTTPS port
        assert get_info(tls_to(srv, port, "http/1.1", cert, key))["module_port"] == port
    finally:
        srv.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_enrollment_presence_and_a_session_through_a_connect_only_proxy(tmp_path, db_url):
    srv, port = single_port_server(tmp_path, db_url)
    proxy = Tinyproxy(tmp_path / "proxy", connect_ports=[port]).start()
    via_env = {**NO_ENV_PROXY, "https_proxy": proxy.url}
    host = supporter = None
    try:
        single_url = f"https://127.0.0.1:{port}"
        srv.ok("user", "add", "alice", "--role", "supporter", "--password-stdin",
               stdin=SUPPORTER_PASSWORD + "\n")
        alice = tmp_path / "alice"
        enroll_supporter(srv, single_url, alice, env=via_env)          # https_proxy variable
        token = srv.ok("token", "create", "-q").strip()
        pc1 = tmp_path / "pc1"
        enrolled = run_cli("host", "--proxy", proxy.url, "enroll", "--server", single_url,
                           "--ca-fingerprint", srv.fingerprint, "--token", token, "--name", "pc1",
                           "--home", str(pc1), env=NO_ENV_PROXY)      # --proxy option
        assert enrolled.returncode == 0, enrolled.stderr
        assert run_cli("host", "set-password", "--password-stdin", "--home", str(pc1),
                       stdin="right-host-password\n").returncode == 0
        tunnels_after_enrollment = proxy.tunnels()
        assert tunnels_after_enrollment >= 2, proxy.log()

        host = ModuleProcess("host", "run", "--pipe", "--home", str(pc1), env=via_env)
        host.wait_for_line("online; waiting for supporters")
        hosts = run_cli("supporter", "hosts", "--home", str(alice), env=via_env)
        assert hosts.returncode == 0 and "pc1" in hosts.stdout and "online" in hosts.stdout
        status = run_cli("supporter", "status", "--home", str(alice), env=via_env)
        assert status.returncode == 0, status.stderr
        assert f"through the proxy http://tester@127.0.0.1:{proxy.port}" in status.stdout
        assert "s3cret" not in status.stdout

        password = tmp_path / "host-password"
        password.write_text("right-host-password\n")
        supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
                                  "--password-file", str(password), "--home", str(alice),
                                  "--proxy", proxy.url, env=NO_ENV_PROXY)
        supporter.wait_for_line("verification code")
        supporter.wait_for_line("granted control")
        host.send(b"screen bytes through the proxy")
        supporter.read_exactly(b"screen bytes through the proxy")
        supporter.send(b"keys through the proxy")
        host.read_exactly(b"keys through the proxy")
        supporter.close_stdin()
        assert supporter.wait() == 0 and host.wait() == 0
        # control connections and both relay legs went through the proxy's tunnels
        assert proxy.tunnels() >= tunnels_after_enrollment + 4, proxy.log()

        # a refusing proxy is one clear line: no password (407), a port it does not allow (403)
        no_auth = run_cli("supporter", "status", "--proxy", proxy.url_without_password,
                          "--home", str(alice), env=NO_ENV_PROXY)
        assert no_auth.returncode == 1
        assert len(no_auth.stderr.strip().splitlines()) == 1, no_auth.stderr
        assert "refused CONNECT" in no_auth.stderr and "407" in no_auth.stderr
        assert "user and password" in no_auth.stderr and "s3cret" not in no_auth.stderr
        other_port = run_cli("supporter", "enroll", "--server", srv.url, "--ca-fingerprint",
                             srv.fingerprint, "--user", "alice", "--password-stdin", "--home",
                             str(tmp_path / "other"), stdin=SUPPORTER_PASSWORD + "\n", env=via_env)
        assert other_port.returncode == 1
        assert len(other_port.stderr.strip().splitlines()) == 1, other_port.stderr
        assert "refused CONNECT" in other_port.stderr and "403" in other_port.stderr
        gone = run_cli("supporter", "status", "--proxy", f"http://127.0.0.1:{free_port()}",
                       "--home", str(alice), env=NO_ENV_PROXY)
        assert gone.returncode == 1 and "cannot reach the proxy" in gone.stderr
        assert len(gone.stderr.strip().splitlines()) == 1, gone.stderr
    finally:
        for proc in (supporter, host):
            if proc is not None:
                proc.stop()
        proxy.stop()
        srv.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_session_through_a_websocket_over_the_proxy(tmp_path, db_url):
    """--websocket: the module's mutual TLS runs inside a WebSocket on the single port (ALPN
    http/1.1, so the server sees web traffic), through the CONNECT-only proxy."""
    srv, port = single_port_server(tmp_path, db_url)
    proxy = Tinyproxy(tmp_path / "proxy", connect_ports=[port]).start()
    via_env = {**NO_ENV_PROXY, "https_proxy": proxy.url}
    host = supporter = None
    try:
        single_url = f"https://127.0.0.1:{port}"
        srv.ok("user", "add", "alice", "--role", "supporter", "--password-stdin",
               stdin=SUPPORTER_PASSWORD + "\n")
        alice = tmp_path / "alice"
        enroll_supporter(srv, single_url, alice, env=via_env)
        token = srv.ok("token", "create", "-q").strip()
        pc1 = tmp_path / "pc1"
        assert run_cli("host", "enroll", "--server", single_url, "--ca-fingerprint",
                       srv.fingerprint, "--token", token, "--name", "pc1", "--home", str(pc1),
                       env=via_env).returncode == 0
        assert run_cli("host", "set-password", "--password-stdin", "--home", str(pc1),
                       stdin="right-host-password\n").returncode == 0

        status = run_cli("supporter", "status", "--websocket", "--home", str(alice), env=via_env)
        assert status.returncode == 0, status.stderr
        assert "hausmeister:supporter:alice" in status.stdout      # mutual TLS inside the tunnel
        assert "(WebSocket over TLS)" in status.stdout
        host = ModuleProcess("host", "run", "--websocket", "--pipe", "--home", str(pc1),
                             env=via_env)
        host.wait_for_line("online; waiting for supporters")
        password = tmp_path / "host-password"
        password.write_text("right-host-password\n")
        supporter = ModuleProcess("supporter", "connect", "pc1", "--pipe", "--answers", "/dev/null",
                                  "--password-file", str(password), "--home", str(alice),
                                  "--websocket", env=via_env)
        supporter.wait_for_line("verification code")
        supporter.wait_for_line("granted control")
        payload = bytes(range(256)) * 800   # ~200 KB: many WebSocket messages each way
        host.send(payload)
        supporter.read_exactly(payload)
        supporter.send(b"keys through the websocket")
        host.read_exactly(b"keys through the websocket")
        supporter.close_stdin()
        assert supporter.wait() == 0 and host.wait() == 0
        # status, host and supporter control connections and both relay legs were tunnels
        assert srv.log().count("module tunnel (WebSocket) opened") >= 5, srv.log()[-3000:]
        assert "no handshake and first command" not in srv.log()  # proved in time: no deadline

        # a revoked certificate is refused inside the tunnel as on the module port
        srv.ok("cert", "revoke", "hausmeister:supporter:alice")
        refused = run_cli("supporter", "status", "--websocket", "--no-renew", "--home", str(alice),
                          env=via_env)
        assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    finally:
        for proc in (supporter, host):
            if proc is not None:
                proc.stop()
        proxy.stop()
        srv.stop()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_silent_websocket_tunnel_is_closed_at_the_module_deadline(tmp_path, db_url):
    """An upgraded tunnel that never starts its inner TLS is closed like a silent connection on
    the module port (handshake + first-command deadline), not held for ever."""
    import time
    srv, port = single_port_server(tmp_path, db_url, extra="""
[limits]
tls_handshake_seconds = 1.0
first_command_seconds = 1.0
""")
    try:
        sock = tls_to(srv, port, "http/1.1")
        sock.sendall(b"GET /api/v1/module-tunnel HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        opened = time.monotonic()
        sock.settimeout(30)
        try:
            while sock.recv(4096):
                pass
        except (ssl.SSLError, ConnectionResetError):
            pass
        waited = time.monotonic() - opened
        assert 1.5 <= waited < 20, waited
        assert "module tunnel from 127.0.0.1 closed: no handshake and first command within 2 s" \
            in srv.log()

        # a host that proved itself in time keeps its tunnel well past that deadline
        token = srv.ok("token", "create", "-q").strip()
        pc1 = tmp_path / "pc1"
        assert run_cli("host", "enroll", "--server", f"https://127.0.0.1:{port}",
                       "--ca-fingerprint", srv.fingerprint, "--token", token, "--name", "pc1",
                       "--home", str(pc1), env=NO_ENV_PROXY).returncode == 0
        assert run_cli("host", "set-password", "--password-stdin", "--home", str(pc1),
                       stdin="right-host-password\n").returncode == 0
        host = ModuleProcess("host", "--websocket", "run", "--pipe", "--home", str(pc1),
                             env=NO_ENV_PROXY)
        try:
            host.wait_for_line("online; waiting for supporters")
            time.sleep(4)  # twice the deadline: a tunnel that settled must not be cut by it
            assert host.proc.poll() is None
            assert srv.log().count("no handshake and first command") == 1
            listed = [line.split() for line in srv.ok("host", "list").splitlines()]
            assert any(row[:1] == ["pc1"] and "yes" in row for row in listed), listed
        finally:
            host.stop()
    finally:
        srv.stop()
