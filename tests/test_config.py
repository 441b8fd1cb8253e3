"""The one configuration loader: defaults, the example file, and one-line errors for bad keys."""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from server.config import (SCHEMA, Config, ConfigError, from_mapping, load, parse_duration,
                           split_endpoint)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "hausmeister.example.toml"


def write(tmp_path: Path, text: str, name: str = "hausmeister.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text))
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    return message


def sections_of(config: Config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "source"}


# --- defaults and the example file -------------------------------------------------------------

def test_built_in_defaults_are_air_gapped():
    config = load(None)
    assert config.source is None
    assert config.server.data_dir == Path("/var/lib/hausmeister")
    assert config.listen.interface == "127.0.0.1"
    assert (config.listen.https_port, config.listen.module_port) == (8443, 8444)
    assert config.database_url == "sqlite:////var/lib/hausmeister/hausmeister.sqlite3"
    assert not config.mail.enabled and config.mail.smtp_host == ""
    assert not config.s3.enabled and config.s3.endpoint_url == ""
    assert config.avatars.gravatar is False
    assert config.egress.allow == ()
    assert config.certificates.min_tls == "1.2"
    assert parse_duration(config.security.token_default_ttl) == 3600


def test_folders_default_under_data_dir(tmp_path):
    config = load(write(tmp_path, '[server]\ndata_dir = "/srv/hm"\n'))
    assert config.server.cert_dir == Path("/srv/hm/certs")
    assert config.server.protocol_dir == Path("/srv/hm/protocols")
    assert config.server.recording_dir == Path("/srv/hm/recordings")
    assert config.database_url == "sqlite:////srv/hm/hausmeister.sqlite3"


def test_folders_the_operator_chooses(tmp_path):
    config = load(write(tmp_path, '[server]\ndata_dir = "/srv/hm"\ncert_dir = "/etc/hm/certs"\n'
                                  'protocol_dir = "/audit/protocols"\nrecording_dir = "/big/rec"\n'))
    assert config.server.cert_dir == Path("/etc/hm/certs")
    assert config.server.protocol_dir == Path("/audit/protocols")
    assert config.server.recording_dir == Path("/big/rec")


def test_example_file_loads_to_the_built_in_defaults():
    example = load(EXAMPLE)
    assert example.source == EXAMPLE.resolve()
    assert sections_of(example) == sections_of(load(None))


def test_example_file_has_every_key_and_documents_each():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert list(raw) == list(SCHEMA)
    for section, keys in SCHEMA.items():
        assert list(raw[section]) == [k.name for k in keys], section
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    for section, keys in SCHEMA.items():
        for key in keys:
            (index,) = [i for i, line in enumerate(lines) if line.startswith(f"{key.name} = ")
                        and _section_at(lines, i) == section]
            comment = []
            for line in reversed(lines[:index]):
                if not line.startswith("#"):
                    break
                comment.append(line)
            assert comment, f"{section}.{key.name} has no comment"
            assert any("Default" in line for line in comment), f"{section}.{key.name}: no default"
            for choice in key.choices:
                assert any(f'"{choice}"' in line for line in comment), (section, key.name, choice)


def _section_at(lines: list[str], index: int) -> str:
    for line in reversed(lines[:index]):
        if line.startswith("["):
            return line.strip("[] ")
    return ""


def test_example_defaults_are_air_gapped():
    raw = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    assert raw["avatars"]["gravatar"] is False
    assert raw["s3"]["enabled"] is False
    assert raw["mail"]["smtp_host"] == ""
    assert raw["egress"]["allow"] == []
    assert raw["listen"]["interface"] == "127.0.0.1"


def test_every_schema_default_passes_its_own_validation():
    config = from_mapping({s: {k.name: k.default for k in keys} for s, keys in SCHEMA.items()},
                          Path("/"))
    assert sections_of(config) == sections_of(load(None))


# --- paths ---------------------------------------------------------------------------------------

def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    path = write(tmp_path / "etc", '[server]\ndata_dir = "data"\nprotocol_dir = "../audit"\n'
                                   'recording_dir = "./rec"\n')
    monkeypatch.chdir(tmp_path)  # somewhere else: the working directory must not matter
    config = load(path)
    assert config.server.data_dir == tmp_path / "etc" / "data"
    assert config.server.protocol_dir == tmp_path / "audit"
    assert config.server.recording_dir == tmp_path / "etc" / "rec"
    assert config.server.cert_dir == tmp_path / "etc" / "data" / "certs"


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load(write(tmp_path, '[server]\ndata_dir = "~/hm"\n'))
    assert config.server.data_dir == tmp_path / "home" / "hm"


def test_postgresql_url_is_read_as_psycopg():
    config = from_mapping({"database": {"url": "postgresql://hm:pw@db.internal:5433/hm"}}, Path("/"))
    assert config.database_url == "postgresql+psycopg://hm:pw@db.internal:5433/hm"


# --- one line per bad key ---------------------------------------------------------------------

CLUSTER = ('[database]\nurl = "postgresql://u@db/hm"\n[relay]\nexternal = ["127.0.0.1:8445"]\n'
           '[cluster]\nenabled = true\nnode_name = "node-a"\n')

BAD = [
    # (id, TOML, fragments the message must contain: key, value, what is allowed)
    ("unknown section", "[nosuch]\nx = 1\n",
     ["config section [nosuch] is unknown", "allowed sections are server, listen"]),
    ("section not a table", "server = 1\n", ["[server] must be a table", "got 1"]),
    ("unknown key", '[server]\ndata_dri = "/x"\n',
     ["config key server.data_dri is unknown", "allowed keys in [server] are", "data_dir"]),
    ("wrong type", '[listen]\nhttps_port = "8443"\n',
     ["config key listen.https_port", "'8443'", "expected a whole number"]),
    ("float for int", "[listen]\nhttps_port = 8443.0\n",
     ["listen.https_port", "8443.0", "expected a whole number"]),
    ("bool for int", "[certificates]\nmodule_days = true\n",
     ["certificates.module_days", "True", "expected a whole number"]),
    ("port too high", "[listen]\nmodule_port = 70000\n",
     ["listen.module_port", "70000", "from 0 to 65535"]),
    ("port negative", "[mail]\nsmtp_port = -1\n", ["mail.smtp_port", "-1", "from 0 to 65535"]),
    ("same ports", "[listen]\nhttps_port = 9000\nmodule_port = 9000\n",
     ["listen.module_port", "9000", "must differ from listen.https_port"]),
    ("int out of range", "[certificates]\nmodule_days = 0\n",
     ["certificates.module_days", "0", "from 1 to 3650"]),
    ("float out of range", "[certificates]\nrevocation_poll_seconds = 0.0\n",
     ["certificates.revocation_poll_seconds", "0.0", "from 0.1 to 3600"]),
    ("float not a number", "[security]\nlockout_base_seconds = nan\n",
     ["security.lockout_base_seconds", "nan", "expected a number"]),
    ("float infinite", "[security]\nlockout_max_seconds = inf\n",
     ["security.lockout_max_seconds", "inf", "from 0 to 86400"]),
    ("bad choice", '[logging]\nlevel = "verbose"\n',
     ["logging.level", "'verbose'", "allowed: debug, info, warn, error, critical"]),
    ("bad tls", '[certificates]\nmin_tls = "1.1"\n', ["certificates.min_tls", "'1.1'", "allowed: 1.2, 1.3"]),
    ("bad duration", '[security]\ntoken_default_ttl = "1 hour"\n',
     ["security.token_default_ttl", "'1 hour'", "duration like 90s, 15m, 1h or 7d"]),
    ("zero duration", '[security]\ntoken_default_ttl = "0m"\n',
     ["security.token_default_ttl", "'0m'", "longer than zero"]),
    ("bad IP", '[listen]\ninterface = "localhost"\n',
     ["listen.interface", "'localhost'", "expected an IP address"]),
    ("bad IP in list", '[server]\naddresses = ["127.0.0.1", "10.0.0.300"]\n',
     ["server.addresses", "'10.0.0.300'", "does not appear to be an IPv4 or IPv6 address"]),
    ("list of non-strings", "[server]\nnames = [1]\n",
     ["server.names", "[1]", "expected a list of non-empty strings"]),
    ("bad host", '[server]\npublic_host = "my host"\n',
     ["server.public_host", "'my host'", "expected a host name or IP address"]),
    ("bad egress port", '[egress]\nallow = ["db.internal:99999"]\n',
     ["egress.allow", "'db.internal:99999'", "port '99999' is not 1-65535"]),
    ("egress without host", '[egress]\nallow = [":80"]\n', ["egress.allow", "':80'", "missing host"]),
    ("egress unclosed bracket", '[egress]\nallow = ["[::1:80"]\n',
     ["egress.allow", "'[::1:80'", "expected [IPv6 address]:port"]),
    ("egress junk after bracket", '[egress]\nallow = ["[::1]80"]\n',
     ["egress.allow", "'[::1]80'", "expected [IPv6 address]:port"]),
    ("egress name in brackets", '[egress]\nallow = ["[db]:80"]\n',
     ["egress.allow", "'[db]:80'", "'db' in brackets is not an IPv6 address"]),
    ("egress URL", '[egress]\nallow = ["https://s3.internal"]\n',
     ["egress.allow", "'https://s3.internal'", "port '//s3.internal' is not 1-65535"]),
    ("egress URL with port", '[egress]\nallow = ["https://s3.internal:443"]\n',
     ["egress.allow", "'https://s3.internal:443'", "is not a host name or IP address"]),
    ("egress space", '[egress]\nallow = ["db internal:5432"]\n',
     ["egress.allow", "'db internal:5432'", "is not a host name or IP address"]),
    ("egress port word", '[egress]\nallow = ["db:http"]\n', ["egress.allow", "'db:http'", "not 1-65535"]),
    ("renew >= lifetime", "[certificates]\nmodule_days = 30\nrenew_before_days = 30\n",
     ["certificates.renew_before_days = 30", "smaller than certificates.module_days"]),
    ("s3 without endpoint", "[s3]\nenabled = true\n",
     ["s3.enabled = true", "set s3.endpoint_url and s3.bucket"]),
    ("s3 bad url", '[s3]\nendpoint_url = "ftp://s3.internal"\n',
     ["s3.endpoint_url", "'ftp://s3.internal'", "http:// or https:// URL"]),
    ("s3 url port", '[s3]\nendpoint_url = "http://s3.internal:99999"\n',
     ["s3.endpoint_url", "'http://s3.internal:99999'", "port from 1 to 65535"]),
    ("s3 url unbalanced", '[s3]\nendpoint_url = "http://[::1"\n',
     ["s3.endpoint_url", "'http://[::1'", "http:// or https:// URL"]),
    ("mail CA bundle missing", '[mail]\nca_bundle = "/nonexistent/relay-ca.pem"\n',
     ["mail.ca_bundle", "'/nonexistent/relay-ca.pem'", "no such file"]),
    ("s3 CA bundle missing", '[s3]\nca_bundle = "/nonexistent/s3-ca.pem"\n',
     ["s3.ca_bundle", "no such file"]),
    ("console idle not a duration", '[console]\nidle_timeout = "15 minutes"\n',
     ["console.idle_timeout", "duration like 90s"]),
    ("alert percent too high", "[alerts]\ndisk_free_percent = 100\n",
     ["alerts.disk_free_percent", "from 0 to 99"]),
    ("bool wrong type", '[avatars]\ngravatar = "no"\n',
     ["avatars.gravatar", "'no'", "expected true or false"]),
    ("bad db url", '[database]\nurl = "mysql://x/y"\n',
     ["database.url", "'mysql://x/y'", "sqlite:///FILE or postgresql+psycopg://"]),
    ("bad db port", '[database]\nurl = "postgresql://u@db:0x1/hm"\n',
     ["database.url", "'postgresql://u@db:0x1/hm'", "the port must be 1-65535"]),
    ("empty data_dir", '[server]\ndata_dir = ""\n',
     ["server.data_dir = ''", "expected a folder path"]),
    ("path not a string", "[server]\nprotocol_dir = 5\n",
     ["server.protocol_dir", "5", "expected a string"]),
    ("NUL in path", '[server]\nrecording_dir = "rec\\u0000x"\n',
     ["server.recording_dir", "'rec\\x00x'", "must not contain a NUL character"]),
    ("newline in key", '[server]\n"data\\ndir" = "x"\n',
     ["config key server.'data\\ndir' is unknown", "data_dir"]),
    ("newline in section", '["a\\nb"]\nx = 1\n', ["config section ['a\\nb'] is unknown"]),
    # several nodes write protocols and take recordings each: never a node's own default folder
    ("cluster protocols in data_dir", CLUSTER,
     ["server.protocol_dir is missing", "one shared folder", "set server.protocol_dir"]),
    ("cluster recordings in data_dir", '[server]\nprotocol_dir = "/srv/p"\n' + CLUSTER,
     ["server.recording_dir is missing", "one shared folder", "set server.recording_dir"]),
]


@pytest.mark.parametrize("text, fragments", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_key_is_one_line_naming_key_value_and_what_is_allowed(tmp_path, text, fragments):
    message = error_of(tmp_path, text)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "nope.toml")
    message = str(info.value)
    assert "\n" not in message
    assert f"config file {tmp_path / 'nope.toml'} does not exist" in message
    assert "hausmeister.example.toml" in message


def test_folder_instead_of_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(tmp_path)
    assert "\n" not in str(info.value) and "cannot be read" in str(info.value)


@pytest.mark.parametrize("text", ["[server\n", "a = = 1\n", "[server]\ndata_dir = '/x\n",
                                  "[server]\n[server]\n", "x = 1\nx = 2\n"])
def test_invalid_toml_is_one_line(tmp_path, text):
    message = error_of(tmp_path, text)
    assert message.startswith(f"config file {tmp_path / 'hausmeister.toml'} is not valid TOML: ")
    assert "line" in message


def test_good_values_are_accepted(tmp_path):
    config = load(write(tmp_path, """
        [listen]
        interface = "::1"
        https_port = 0
        module_port = 0
        [certificates]
        min_tls = "1.3"
        revocation_poll_seconds = 1
        [security]
        token_default_ttl = "7d"
        [mail]
        smtp_host = "relay.internal"
        smtp_port = 587
        [s3]
        enabled = true
        endpoint_url = "https://[fd00::9]:9000"
        bucket = "recordings"
        [egress]
        allow = ["ldap.internal:636", "files.internal:*", "[fd00::5]:443", "10.0.0.7"]
    """.replace("\n        ", "\n")))
    assert config.listen.interface == "::1" and config.listen.https_port == 0
    assert config.certificates.revocation_poll_seconds == 1.0
    assert isinstance(config.certificates.revocation_poll_seconds, float)
    assert config.mail.enabled and config.s3.enabled
    assert config.egress.allow == ("ldap.internal:636", "files.internal:*", "[fd00::5]:443", "10.0.0.7")


# --- split_endpoint and parse_duration ---------------------------------------------------------

hostnames = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?){0,3}\Z")
ipv4s = st.ip_addresses(v=4).map(str)
ipv6s = st.ip_addresses(v=6).map(str)
ports = st.one_of(st.none(), st.integers(1, 65535))


@given(host=st.one_of(hostnames, ipv4s), port=ports, star=st.booleans())
def test_split_endpoint_round_trip_name_or_ipv4(host, port, star):
    text = f"{host}:{port}" if port is not None else (f"{host}:*" if star else host)
    assert split_endpoint(text) == (host, port)


@given(host=ipv6s, port=ports, star=st.booleans())
def test_split_endpoint_round_trip_ipv6(host, port, star):
    text = f"[{host}]:{port}" if port is not None else (f"[{host}]:*" if star else f"[{host}]")
    assert split_endpoint(text) == (host, port)


@given(st.text(max_size=40))
def test_split_endpoint_returns_or_raises_value_error(text):
    try:
        host, port = split_endpoint(text)
    except ValueError as exc:
        assert "\n" not in str(exc)
        return
    assert host and "/" not in host and not any(c.isspace() for c in host)
    assert port is None or 1 <= port <= 65535


@pytest.mark.parametrize("text", ["٣:80", "db:٣", "db:²", "db:8 0", "[::1]", "db:"])
def test_split_endpoint_edge_cases(text):
    if text in ("[::1]", "db:"):
        assert split_endpoint(text)[1] is None
    elif text == "٣:80":
        assert split_endpoint(text) == ("٣", 80)  # a (strange) name, but only ASCII digits are ports
    else:
        with pytest.raises(ValueError):
            split_endpoint(text)


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@given(number=st.integers(1, 10**6), unit=st.sampled_from(sorted(UNITS)),
       pad=st.sampled_from(["", " ", "\t"]))
def test_parse_duration_round_trip(number, unit, pad):
    assert parse_duration(f"{pad}{number}{unit}{pad}") == number * UNITS[unit]


@given(st.text(max_size=12))
def test_parse_duration_returns_positive_or_raises_value_error(text):
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert seconds > 0 and seconds == int(seconds)
    assert text.strip()[:-1].isascii()


@pytest.mark.parametrize("text", ["", "h", "1", "-5m", "+5m", "1.5h", "٣h", "²m", "5 m", "0s", "1w"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- the loader never fails with anything but a one-line ConfigError ---------------------------

toml_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=5,
).filter(lambda v: v is not None)
known_keys = st.sampled_from([(s, k.name) for s, keys in SCHEMA.items() for k in keys])


@example(assignments=[(("server", "data_dir"), "~0")], extra={})  # a user that does not exist
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(known_keys, toml_values), max_size=4),
       st.dictionaries(st.text(max_size=8), st.dictionaries(st.text(max_size=8), st.integers(), max_size=2),
                       max_size=2))
def test_any_values_give_a_config_or_one_line_error(assignments, extra):
    raw: dict = {}
    for (section, key), value in assignments:
        raw.setdefault(section, {})[key] = value
    for section, body in extra.items():
        raw.setdefault(section, body)
    try:
        config = from_mapping(raw, Path("/srv/hm"))
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("config ") and "\n" not in message and "\r" not in message
        assert message.isprintable(), message
        return
    for section in SCHEMA:
        values = dataclasses.asdict(getattr(config, section))
        for value in values.values():
            if isinstance(value, float):
                assert math.isfinite(value)
    assert config.certificates.renew_before_days < config.certificates.module_days


# --- files that cannot be read as a config: one line naming the file, the problem and the fix ---

@pytest.mark.parametrize("content, fragment", [
    ("[server]\ndata_dir = 'Stra\u00dfe'\n".encode("latin-1"), "is not UTF-8 text (byte 0xdf on line 2)"),
    (bytes(range(256)) * 4, "is not UTF-8 text (byte 0x80 on line 2)"),
    (b"\x00\x01\x02garbage", "is not valid TOML"),
    (b"#" * ((1 << 20) + 1), "is larger than 1 MiB"),
])
def test_unreadable_content_is_one_line_naming_file_and_fix(tmp_path, content, fragment):
    path = tmp_path / "hausmeister.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message and message.isprintable(), message
    assert message.startswith(f"config file {path} ") and fragment in message, message


def test_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "hausmeister.toml"
    path.write_bytes(b"\xef\xbb\xbf[listen]\nhttps_port = 9443\n")
    assert load(path).listen.https_port == 9443


def test_pipe_is_refused_without_waiting_for_a_writer(tmp_path):
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    error = outcome_of_reading_a_fifo(fifo, load)
    assert isinstance(error, ConfigError), error
    assert "is not a regular file (a pipe or socket); pass --config" in str(error)


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


def test_endless_device_is_refused_after_a_bounded_read():
    """In a child with 1 GiB of address space, so a reader without a bound (which would read
    /dev/zero until memory runs out) fails this test instead of the machine."""
    import resource
    import subprocess
    import sys

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    code = ("from server.config import ConfigError, load\n"
            "try:\n    load('/dev/zero')\nexcept ConfigError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, preexec_fn=limit_memory, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout.startswith("config file /dev/zero is larger than 1 MiB"), result.stdout


_config_bytes = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(lambda head, junk, tail: head + junk + tail,
              st.sampled_from([b"", b"[server]\n", b"[listen]\nhttps_port = ", b"a = \""]),
              st.binary(max_size=40), st.sampled_from([b"", b"\n", b"\"\n", b"]\n"])),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(_config_bytes)
def test_any_file_bytes_give_a_config_or_one_line_error(tmp_path, content):
    """Fuzz target for the loader from the file's bytes on: nothing but a one-line ConfigError."""
    path = tmp_path / "fuzz.toml"
    path.write_bytes(content)
    try:
        load(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"config file {path} ") or message.startswith("config "), message
        assert "\n" not in message and "\r" not in message, message
