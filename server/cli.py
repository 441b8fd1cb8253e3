"""``hausmeister-server``: set up, run and administer the server.

Every refusal is one line on stderr naming the problem and the fix, with exit code 2 (usage or
configuration) or 1 (a refused operation); nothing already stored is changed by a refusal.
"""

from __future__ import annotations

import argparse
import json
import getpass
import os
import sys
from pathlib import Path
from typing import Callable

from . import egress  # first: the guard is installed before anything else can connect

egress.install()

from protocol.identity import fingerprint  # noqa: E402
from sqlalchemy import func, select, update  # noqa: E402

from . import __version__, accounts, bootstrap, certificates, pki  # noqa: E402
from .config import Config, ConfigError, load, parse_duration  # noqa: E402
from .db import Database, DatabaseError  # noqa: E402

DEFAULT_CONFIG = "/etc/hausmeister/hausmeister.toml"


class CLIError(Exception):
    """Printed as ``hausmeister-server: error: <message>``; exit code 1."""


def _config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    env = os.environ.get("HAUSMEISTER_CONFIG")
    if env:
        return env
    return DEFAULT_CONFIG if Path(DEFAULT_CONFIG).exists() else None


def _read_password(args: argparse.Namespace, prompt: str, confirm: bool = True) -> str:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline().rstrip("\n")
        if not line:
            raise CLIError("no password on standard input (--password-stdin expects one line)")
        return line
    if getattr(args, "generate_password", False):
        return accounts.generate_password()
    if not sys.stdin.isatty():
        raise CLIError("no terminal to ask for the password: use --password-stdin or --generate-password")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat: ") != first:
        raise CLIError("the two passwords differ; nothing was changed")
    return first


def _open_db(config: Config) -> Database:
    if not bootstrap.is_initialised(config):
        raise CLIError(f"the server is not set up in {config.server.data_dir}: "
                       "run `hausmeister-server init` first")
    db = Database(config.database_url)
    db.check_current()
    return db


# --- commands ---------------------------------------------------------------------------------

def cmd_init(config: Config, args: argparse.Namespace) -> int:
    password = _read_password(args, "Password for the first admin: ") if (
        args.password_stdin) else None
    try:
        result = bootstrap.initialise(config, force=args.force, admin_name=args.admin,
                                      tenant_name=args.tenant, admin_password=password)
    except (bootstrap.InitError, accounts.AccountError, pki.PKIError) as exc:
        raise CLIError(str(exc))
    _print_init(config, result)
    return 0


def _print_init(config: Config, result: bootstrap.InitResult) -> None:
    print(f"Data folder:      {config.server.data_dir}")
    print(f"CA:               {'created' if result.created_ca else 'kept existing'} in "
          f"{config.server.cert_dir}")
    print(f"CA fingerprint:   {result.ca_fingerprint}")
    if result.admin_password:
        print(f"First admin:      {result.admin_name} (tenant {result.tenant})")
        print(f"Admin password:   {result.admin_password}   <- shown once, store it safely")
    else:
        print("First admin:      already present, unchanged")


def _run_relay(config: Config, args: argparse.Namespace) -> int:
    """``run --role relay``: a separate relay process (on the reactor ``cmd_run`` installs)."""
    if not bootstrap.is_initialised(config):
        raise CLIError(f"the server is not set up in {config.server.data_dir}: run "
                       "`hausmeister-server init` first (a relay process uses the server's "
                       "certificate, database and relay secret)")
    if args.relay_port is not None and not 0 <= args.relay_port <= 65535:
        raise CLIError(f"--relay-port {args.relay_port}: expected a port from 0 to 65535")
    _install_reactor(config.logging.format)
    from twisted.internet import reactor

    from protocol.runtime import start_logging

    from .relay.listener import run_relay
    start_logging(args.log_level or config.logging.level, config.logging.format)
    return run_relay(config, reactor, None if args.relay_port is None else [args.relay_port])


def _raise_open_file_limit() -> None:
    """One descriptor per module connection: use all the hard limit allows."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _install_reactor(log_format: str = "json") -> None:
    """Twisted's default reactor (epoll on Linux) for the server and relay processes, not the
    asyncio one: per ready socket and per timer it runs less Python (no asyncio ``Handle``, no
    selector wrapper, no ``call_soon``), which is the module port's hot path — heartbeats,
    registrations, ad-hoc set-ups — and epoll moves ~10 % more relay bytes per CPU second
    (bench/README.md, "the server on the epoll reactor").  The one asyncio user, the mail
    outbox (aiosmtplib), runs its coroutine on a loop of its own in the blocking pool.  With
    the JSON log, without the log context Twisted builds around every socket event, which that
    log never writes (``server.reactor``)."""
    from .reactor import install
    install(log_format)


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    _raise_open_file_limit()
    if args.role == "relay":
        return _run_relay(config, args)
    _install_reactor(config.logging.format)
    from twisted.internet import reactor
    from twisted.logger import Logger

    from protocol.runtime import start_logging, tune_gc

    from .app import HausmeisterServer
    if not bootstrap.is_initialised(config):
        try:
            result = bootstrap.initialise(config)
        except (bootstrap.InitError, accounts.AccountError, pki.PKIError) as exc:
            raise CLIError(f"first start: {exc}")
        print("First start: the server was set up.")
        _print_init(config, result)
    start_logging(args.log_level or config.logging.level, config.logging.format)
    srv = HausmeisterServer(config, reactor)
    srv.startService()
    for line in srv.warn_about_folders():
        print(line, flush=True)
    info = srv.state
    print(f"Console and enrollment: {info['https_url']}/")
    print(f"Module port:            {config.server.public_host}:{info['module_port']}")
    print(f"CA fingerprint:         {info['ca_fingerprint']}")
    print("Press Ctrl+C to stop.", flush=True)
    reactor.addSystemEventTrigger("before", "shutdown", srv.stopService)
    Logger(namespace="server.cli").info("reactor {reactor}, garbage collector: {gc}",
                                        reactor=type(reactor).__name__, gc=tune_gc())
    reactor.run()
    return 0


def cmd_migrate(config: Config, args: argparse.Namespace) -> int:
    db = Database(config.database_url)
    try:
        db.migrate()
    finally:
        db.dispose()
    print(f"database {db.safe_url} is at the newest schema")
    return 0


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    problems = 0
    print(f"config:            {config.source or 'built-in defaults'} (valid)")
    store = pki.CertStore(config.server.cert_dir)
    if store.exists():
        ca = store.ca_cert()
        print(f"CA:                {store.ca_cert_path}, valid until "
              f"{ca.not_valid_after_utc:%Y-%m-%d}, fingerprint {fingerprint(ca)}")
        print(f"CA key:            {'present' if store.ca_key_path.exists() else 'absent (cannot enroll modules)'}")
    else:
        print("CA:                missing: run `hausmeister-server init`")
        problems += 1
    db = Database(config.database_url)
    try:
        db.check_current()
        print(f"database:          {db.safe_url} (schema current)")
    except DatabaseError as exc:
        print(f"database:          {exc}")
        problems += 1
    except Exception as exc:  # unreachable database and the like: say it, do not crash
        print(f"database:          {db.safe_url} cannot be used: {exc}")
        problems += 1
    finally:
        db.dispose()
    from . import storage_health
    folder_problems = {what: problem for what, _, problem in storage_health.folder_problems(
        storage_health.operator_folders(config), config.alerts.disk_free_percent)}
    for what, folder in storage_health.operator_folders(config).items():
        label = f"{what} folder:"
        print(f"{label:19}{folder_problems.get(what) or f'{folder} (writable)'}")
    problems += len(folder_problems)
    refusals = egress.count_refusals(config.server.data_dir / "egress-refusals.jsonl")
    print(f"egress refusals:   {refusals}")
    print("mail:              " + (f"via {config.mail.smtp_host}:{config.mail.smtp_port}"
                                   if config.mail.enabled else "off (no SMTP relay set)"))
    print("S3:                " + (config.s3.endpoint_url if config.s3.enabled else "off"))
    if config.directory.enabled:
        from .directory.client import Directory, DirectoryUnavailable
        try:
            print(f"directory:         {Directory(config.directory).probe()}")
        except DirectoryUnavailable as exc:
            print(f"directory:         {exc}")
            problems += 1
    else:
        print("directory:         off (local accounts only)")
    print("Gravatar:          " + ("on" if config.avatars.gravatar else "off"))
    return 1 if problems else 0


def cmd_cert_list(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    with db.session() as session:
        rows = certificates.list_certificates(session, include_revoked=not args.live)
        print(f"{'SERIAL':34} {'ROLE':9} {'NOT AFTER':10} {'STATUS':8} IDENTITY")
        for row in rows:
            status = "revoked" if row.revoked_at else "valid"
            print(f"{row.serial:34} {row.role.value:9} {row.not_after:%Y-%m-%d} {status:8} {row.identity}")
    return 0


def cmd_cert_revoke(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    try:
        with db.session() as session:
            rows = certificates.revoke(session, args.target, args.reason)
            for row in rows:
                tenant = accounts.tenant_of_identity(session, row.identity)
                accounts.audit(session, args.actor, "certificate.revoke",
                               f"serial={row.serial} identity={row.identity}",
                               tenant_id=tenant.id if tenant else None)
    except certificates.EnrollmentError as exc:
        raise CLIError(str(exc))
    for row in rows:
        print(f"revoked {row.serial} ({row.identity})")
    return 0


def cmd_cert_install(config: Config, args: argparse.Namespace) -> int:
    try:
        ca_cert = pki.load_certs(Path(args.ca_cert))[0]
        ca_key = pki.load_key(Path(args.ca_key)) if args.ca_key else None
        chain = pki.load_certs(Path(args.server_cert)) if args.server_cert else None
        server_key = pki.load_key(Path(args.server_key)) if args.server_key else None
        pki.validate_install(ca_cert, ca_key, chain, server_key)
    except pki.PKIError as exc:
        raise CLIError(str(exc) + "; nothing was installed")
    if args.server_key and not args.server_cert:
        raise CLIError("--server-key needs --server-cert; nothing was installed")
    store = pki.CertStore(config.server.cert_dir)
    if store.exists() and not args.replace_ca:
        current = store.ca_cert()
        if current != ca_cert:
            raise CLIError(f"a different CA is already installed in {store.folder}: pass --replace-ca "
                           "to replace it (every enrolled module must then enroll again); nothing was installed")
    if chain is None and not (store.server_cert_path.exists() and
                              pki.issued_by(store.server_chain()[0], ca_cert)):
        if ca_key is None:
            raise CLIError("no server certificate from this CA: pass --server-cert and --server-key, "
                           "or --ca-key so one can be issued; nothing was installed")
        server_key, leaf = pki.issue_server_cert(ca_key, ca_cert, config.server.names,
                                                 config.server.addresses, config.certificates.server_days)
        chain = [leaf]
    bootstrap.make_folders(config)
    if ca_key is None and store.ca_key_path.exists() and store.ca_cert() != ca_cert:
        store.ca_key_path.unlink()  # the old CA's key must not sit beside a new CA certificate
    store.write_ca(ca_key, ca_cert)
    if chain is not None:
        store.write_server(server_key, chain)
    print(f"installed CA {ca_cert.subject.rfc4514_string()} into {store.folder}"
          + (" with its key" if ca_key else " without its key (module enrollment needs the CA key)"))
    if chain is not None:
        print(f"installed server certificate for {chain[0].subject.rfc4514_string()}")
    return 0


def cmd_user_add(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    role = _role(args.role)
    password = _read_password(args, f"Password for {args.name}: ")
    try:
        with db.session() as session:
            tenant = accounts.tenant_named(session, args.tenant)
            accounts.add_user(session, tenant, args.name, role, password, args.email)
            accounts.audit(session, args.actor, "user.add", f"name={args.name} role={role.value} "
                           f"tenant={tenant.name}", tenant_id=tenant.id)
    except accounts.AccountError as exc:
        raise CLIError(str(exc))
    print(f"user {args.name} added to tenant {args.tenant} as {role.value}")
    if args.generate_password:
        print(f"password: {password}   <- shown once")
    return 0


def _role(text: str) -> accounts.Role:
    try:
        return accounts.parse_role(text)
    except accounts.AccountError as exc:
        raise CLIError(str(exc))


def cmd_user_list(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    with db.session() as session:
        users = session.query(accounts.User).order_by(accounts.User.name).all()
        print(f"{'NAME':24} {'ROLE':10} {'TENANT':16} STATUS")
        for user in users:
            print(f"{user.name:24} {user.role.value:10} {user.tenant.name:16} "
                  f"{'disabled' if user.disabled else 'active'}")
    return 0


def _change_user(config: Config, args: argparse.Namespace, change: Callable, action: str) -> None:
    db = _open_db(config)
    try:
        with db.session() as session:
            user = accounts.user_named(session, args.name)
            detail = change(session, user)
            accounts.audit(session, args.actor, action, f"name={args.name} {detail}".strip(),
                           tenant_id=user.tenant_id)
    except accounts.AccountError as exc:
        raise CLIError(str(exc))


def cmd_user_passwd(config: Config, args: argparse.Namespace) -> int:
    password = _read_password(args, f"New password for {args.name}: ")

    def change(session, user):
        user.password_hash = accounts.hash_password(password)
        accounts.Lockouts(accounts.LockoutPolicy()).succeeded(session, [f"user:{user.name}"])
        end_for_user(session, user.name)  # logged in with the old password: log in again
        return ""
    _change_user(config, args, change, "user.passwd")
    print(f"password of {args.name} changed")
    if args.generate_password:
        print(f"password: {password}   <- shown once")
    return 0


def end_for_user(session, name: str) -> int:
    from .console.sessions import end_for_user as end_console_sessions
    return end_console_sessions(session, name)


def cmd_user_disable(config: Config, args: argparse.Namespace) -> int:
    revoked: list = []

    def change(session, user):
        user.disabled = not args.enable
        if user.disabled:  # its modules lose access and its live sessions end
            end_for_user(session, user.name)  # its console logins too, on every node
            revoked.extend(certificates.revoke_identity(
                session, certificates.supporter_identity(user.name), "user disabled"))
        return f"disabled={user.disabled}" + (f" revoked={len(revoked)}" if revoked else "")
    _change_user(config, args, change, "user.enable" if args.enable else "user.disable")
    print(f"user {args.name} {'enabled' if args.enable else 'disabled'}")
    if revoked:
        print(f"revoked {len(revoked)} certificate(s) of {args.name}: its live sessions end within "
              f"{config.certificates.revocation_poll_seconds:g} s; enabling the user again needs "
              "a new enrollment")
    return 0


def cmd_node_list(config: Config, args: argparse.Namespace) -> int:
    """Several nodes on one database: the server nodes and relay processes, and which live."""
    from .db.models import Host, ServerNode
    from .pki import utcnow
    db = _open_db(config)
    timeout = config.cluster.node_timeout_seconds
    with db.session() as session:
        nodes = session.scalars(select(ServerNode).order_by(ServerNode.kind.desc(),
                                                            ServerNode.name)).all()
        hosts = dict(session.execute(select(Host.node, func.count()).where(
            Host.online.is_(True), Host.node.is_not(None)).group_by(Host.node)).all())
        now = utcnow()
        if not nodes:
            print("no server node or relay process is registered (one node runs with "
                  "[cluster] off and does not register)")
            return 0
        print(f"{'NAME':32} {'KIND':6} {'STATE':5} {'PID':>7} {'STARTED (UTC)':16} "
              f"{'SEEN':>6} {'HOSTS':>6} SESSIONS")
        for node in nodes:
            quiet = (now - node.seen_at).total_seconds()
            state = "live" if quiet <= timeout else "dead"
            carried = len([s for s in (node.sessions or "").split("\n") if s])
            print(f"{node.name[:32]:32} {node.kind:6} {state:5} {node.pid:>7} "
                  f"{node.started_at:%Y-%m-%d %H:%M} {quiet:5.0f}s "
                  f"{hosts.get(node.name, 0) if node.kind == 'server' else '-':>6} "
                  f"{carried if node.kind == 'relay' else '-'}")
    return 0


def cmd_host_list(config: Config, args: argparse.Namespace) -> int:
    from .db.models import Host, HostGroup, Tenant
    db = _open_db(config)
    with db.session() as session:
        rows = session.execute(
            select(Host, HostGroup.name, Tenant.name).outerjoin(HostGroup, Host.group_id == HostGroup.id)
            .join(Tenant, Host.tenant_id == Tenant.id).order_by(Tenant.name, Host.name)).all()
        print(f"{'NAME':24} {'TENANT':12} {'GROUP':12} {'ONLINE':6} {'LAST SEEN (UTC)':16} ID")
        for host, group, tenant in rows:
            seen = f"{host.last_seen:%Y-%m-%d %H:%M}" if host.last_seen else "-"
            print(f"{host.name[:24]:24} {tenant[:12]:12} {(group or '-')[:12]:12} "
                  f"{'yes' if host.online else 'no':6} {seen:16} {host.id}")
    return 0


def cmd_host_remove(config: Config, args: argparse.Namespace) -> int:
    from .db.models import Host, Session as SessionRow
    db = _open_db(config)
    with db.session() as session:
        hosts = list(session.scalars(select(Host).where(
            (Host.id == args.host) | (Host.name == args.host))))
        if not hosts:
            raise CLIError(f"no host {args.host!r} (see `hausmeister-server host list`)")
        if len(hosts) > 1:
            raise CLIError(f"{len(hosts)} hosts are named {args.host!r}: give the host id "
                           "(see `hausmeister-server host list`)")
        host = hosts[0]
        revoked = certificates.revoke_identity(session, f"hausmeister:host:{host.id}",
                                               "host removed")
        # past sessions keep the host's identity (peer_identity); only the link to the row goes
        session.execute(update(SessionRow).where(SessionRow.host_id == host.id)
                        .values(host_id=None))
        accounts.audit(session, args.actor, "host.remove",
                       f"id={host.id} name={host.name} revoked={len(revoked)}",
                       tenant_id=host.tenant_id)
        name, host_id = host.name, host.id
        session.delete(host)
    print(f"host {name} ({host_id}) removed; {len(revoked)} certificate(s) revoked: its live "
          f"sessions end within {config.certificates.revocation_poll_seconds:g} s")
    return 0


def cmd_user_role(config: Config, args: argparse.Namespace) -> int:
    role = _role(args.role)

    def change(session, user):
        user.role = role
        return f"role={role.value}"
    _change_user(config, args, change, "user.role")
    print(f"user {args.name} now has role {role.value}")
    return 0


def cmd_tenant_add(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    with db.session() as session:
        if session.query(accounts.Tenant).filter_by(name=args.name).first():
            raise CLIError(f"tenant {args.name!r} already exists")
        accounts.get_or_create_tenant(session, args.name)
        accounts.audit(session, args.actor, "tenant.add", f"name={args.name}")
    print(f"tenant {args.name} added")
    return 0


def cmd_tenant_list(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    with db.session() as session:
        for tenant in session.query(accounts.Tenant).order_by(accounts.Tenant.name):
            print(tenant.name)
    return 0


def cmd_group_add(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    try:
        with db.session() as session:
            tenant = accounts.tenant_named(session, args.tenant)
            accounts.add_group(session, tenant, args.name)
            accounts.audit(session, args.actor, "group.add", f"name={args.name} tenant={tenant.name}",
                           tenant_id=tenant.id)
    except accounts.AccountError as exc:
        raise CLIError(str(exc))
    print(f"group {args.name} added to tenant {args.tenant}")
    return 0


def cmd_group_list(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    with db.session() as session:
        for group in session.query(accounts.HostGroup).order_by(accounts.HostGroup.name):
            print(f"{group.name:24} {group.tenant.name}")
    return 0


def cmd_user_groups(config: Config, args: argparse.Namespace) -> int:
    db = _open_db(config)
    try:
        with db.session() as session:
            user = accounts.user_named(session, args.name)
            for name in args.add or []:
                accounts.set_membership(session, user, accounts.group_named(session, user.tenant, name), True)
            for name in args.remove or []:
                accounts.set_membership(session, user, accounts.group_named(session, user.tenant, name), False)
            if args.add or args.remove:
                accounts.audit(session, args.actor, "user.groups",
                               f"name={args.name} add={args.add or []} remove={args.remove or []}",
                               tenant_id=user.tenant_id)
            groups = accounts.memberships(session, user)
    except accounts.AccountError as exc:
        raise CLIError(str(exc))
    print(f"{args.name}: " + (", ".join(groups) if groups else "no groups (reaches every host of its tenant)"))
    return 0


def cmd_session_list(config: Config, args: argparse.Namespace) -> int:
    from .db.models import Host, Session
    db = _open_db(config)
    with db.session() as session:
        rows = session.execute(select(Session, Host.name).outerjoin(Host, Session.host_id == Host.id)
                               .order_by(Session.created_at.desc()).limit(args.limit)).all()
        if args.json:
            print(json.dumps([{
                "id": r.id, "kind": r.kind, "supporter": r.supporter_identity,
                "supporter_address": r.supporter_address, "peer": r.peer_identity,
                "peer_address": r.peer_address, "host_id": r.host_id, "host_name": host_name,
                "created_at": r.created_at.isoformat(),
                "ended_at": r.ended_at.isoformat() if r.ended_at else None,
                "bytes_to_peer": r.bytes_to_peer, "bytes_to_supporter": r.bytes_to_supporter,
                "end_reason": r.end_reason, "end_cause": r.end_cause, "ended_by": r.ended_by}
                for r, host_name in rows], indent=1))
            return 0
        print(f"{'STARTED (UTC)':19} {'KIND':6} {'SUPPORTER':16} {'CUSTOMER OR HOST':24} "
              f"{'BYTES ->/<-':>17}  END")
        for r, host_name in rows:
            supporter = (r.supporter_identity or "").removeprefix("hausmeister:supporter:")
            if r.kind == "host":
                peer = host_name or (r.peer_identity or "").removeprefix("hausmeister:host:")
                peer += "" if host_name else " (removed)"
            else:
                peer = f"customer {r.peer_address or '?'}"
            end = r.end_reason or ("running" if r.ended_at is None else "")
            print(f"{r.created_at:%Y-%m-%d %H:%M:%S} {r.kind:6} {supporter:16} {peer:24} "
                  f"{r.bytes_to_peer:>8}/{r.bytes_to_supporter:<8}  {end}")
    return 0


def cmd_mail_test(config: Config, args: argparse.Namespace) -> int:
    from .mail import MailDisabled, Outbox
    db = _open_db(config)
    try:
        mail_id = Outbox(db, config.mail).queue(
            args.address, "Hausmeister test mail",
            "This is a test mail from your Hausmeister server. Mail delivery works.")
    except (MailDisabled, ValueError) as exc:
        raise CLIError(str(exc))
    print(f"test mail {mail_id} queued for {args.address}; the running server delivers it "
          f"through {config.mail.smtp_host}:{config.mail.smtp_port} (see `mail status`)")
    return 0


def cmd_mail_status(config: Config, args: argparse.Namespace) -> int:
    from .mail import Outbox
    if not config.mail.enabled:
        print("mail is off: no SMTP relay is configured ([mail] smtp_host)")
        return 0
    counts = Outbox(_open_db(config), config.mail).counts()
    print(f"queued: {counts['queued']}   sent: {counts['sent']}   failed: {counts['failed']}")
    return 0


def cmd_token_create(config: Config, args: argparse.Namespace) -> int:
    try:
        ttl = parse_duration(args.ttl or config.security.token_default_ttl)
    except ValueError as exc:
        raise CLIError(f"--ttl: {exc}")
    db = _open_db(config)
    try:
        with db.session() as session:
            tenant = accounts.tenant_named(session, args.tenant)
            group = accounts.group_named(session, tenant, args.group) if args.group else None
            token, row = certificates.create_token(session, tenant, group, ttl, args.actor)
            accounts.audit(session, args.actor, "token.create",
                           f"id={row.id} group={args.group} ttl={int(ttl)}s", tenant_id=tenant.id)
            expires = row.expires_at
    except accounts.AccountError as exc:
        raise CLIError(str(exc))
    if args.quiet:
        print(token)
    else:
        print(f"token:   {token}")
        print(f"expires: {expires:%Y-%m-%d %H:%M:%S} UTC (single use)")
        url, ca_fingerprint = _server_url_and_fingerprint(config)
        print(f"enroll:  hausmeister-host enroll --server {url} --ca-fingerprint {ca_fingerprint} "
              f"--token {token} --name NAME")
    return 0


def _server_url_and_fingerprint(config: Config) -> tuple[str, str]:
    """What a module needs to reach this server: the running server's URL (its state file), else
    the configured one; and the CA fingerprint."""
    from .state import read_state
    state = read_state(config.server.data_dir) or {}
    port = state.get("https_port") or config.listen.https_port
    url = f"https://{config.server.public_host}:{port}"
    try:
        ca_fingerprint = fingerprint(pki.CertStore(config.server.cert_dir).ca_cert())
    except (OSError, ValueError, pki.PKIError):
        ca_fingerprint = "FP (no CA yet: run `hausmeister-server init`)"
    return url, ca_fingerprint


def _protocol_anchors(config: Config, files: list[Path]) -> dict[str, tuple[int, str]] | None:
    """The ``ended`` line the database recorded per session (None: no database to ask)."""
    if not bootstrap.is_initialised(config):
        return None
    from sqlalchemy import select

    from .db import DatabaseError
    from .db.models import Session as SessionRow
    ids = [f.stem for f in files]
    try:
        db = _open_db(config)
    except (DatabaseError, CLIError) as exc:
        print(f"note: {exc}; checking the hash chains only", file=sys.stderr)
        return None
    try:
        def read(session) -> dict[str, tuple[int, str]]:
            found = {}
            for start in range(0, len(ids), 500):
                rows = session.execute(select(SessionRow.id, SessionRow.protocol_end_seq,
                                              SessionRow.protocol_end_hash)
                                       .where(SessionRow.id.in_(ids[start:start + 500]),
                                              SessionRow.protocol_end_hash.is_not(None)))
                found.update({sid: (seq, digest) for sid, seq, digest in rows})
            return found
        return db.call(read)
    finally:
        db.dispose()


def cmd_protocol_verify(config: Config, args: argparse.Namespace) -> int:
    from . import session_protocol
    path = Path(args.path)
    if not path.exists():
        raise CLIError(f"{path} does not exist (give a protocol file or a folder of them)")
    if path.is_dir() and not session_protocol.protocol_files(path):
        raise CLIError(f"no protocol files (*.jsonl) in {path}")
    anchors = None if args.no_db else _protocol_anchors(config, session_protocol.protocol_files(path))
    result = session_protocol.verify(path, anchors)
    if not result.ok:
        raise CLIError(result.summary())
    from .recordings.cli import protocol_recording_problems
    broken = protocol_recording_problems(config, session_protocol.protocol_files(path))
    if broken:
        raise CLIError("; ".join(broken))
    print(result.summary())
    if result.unended:
        print(f"{len(result.unended)} session(s) without the server's 'ended' line (still running, "
              "or the end of the file is missing): " + ", ".join(p.stem for p in result.unended))
    return 0


def cmd_protocol_show(config: Config, args: argparse.Namespace) -> int:
    from . import session_protocol
    try:
        print(session_protocol.show(config.server.protocol_dir, args.session), end="")
    except session_protocol.ProtocolError as exc:
        raise CLIError(str(exc))
    except OSError as exc:
        raise CLIError(f"cannot read the protocol of {args.session}: {exc.strerror or exc} "
                       f"({exc.filename})")
    return 0


# --- parser -----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hausmeister-server",
                                description="Hausmeister private remote-maintenance server.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("-c", "--config", help="TOML config file (default: $HAUSMEISTER_CONFIG, then "
                   f"{DEFAULT_CONFIG} if present, else built-in defaults)")
    p.add_argument("--log-level", choices=["debug", "info", "warn", "error", "critical"],
                   help="override logging.level from the config")
    p.add_argument("--actor", default=os.environ.get("SUDO_USER") or os.environ.get("USER") or "cli",
                   help="name recorded in the audit log for this change (default: your login)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("init", help="create data folders, CA, server certificate, database, first admin")
    s.add_argument("--force", action="store_true",
                   help="complete setup in a non-empty data folder (an existing CA is never replaced)")
    s.add_argument("--admin", default="admin", help="name of the first admin (default: admin)")
    s.add_argument("--tenant", default="default", help="name of the first tenant (default: default)")
    s.add_argument("--password-stdin", action="store_true",
                   help="read the admin password from standard input instead of generating one")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("run", help="run the server (sets itself up on first start)")
    s.add_argument("--role", choices=["all", "relay"], default="all",
                   help="which parts to run (all: HTTPS plane and module port, with the relay "
                   "inside; relay: only a relay process on relay.port, for relay.external: the "
                   "operator starts one per CPU core, each with its own --relay-port)")
    s.add_argument("--relay-port", type=int, metavar="N",
                   help="with --role relay: listen on this port instead of relay.port (0: any)")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("migrate", help="bring the database schema to the newest revision")
    s.set_defaults(func=cmd_migrate)

    s = sub.add_parser("check", help="check config, CA and database; show egress refusals")
    s.set_defaults(func=cmd_check)

    cert = sub.add_parser("cert", help="certificates: list, revoke, install an own CA")
    csub = cert.add_subparsers(dest="cert_command", metavar="ACTION", required=True)
    s = csub.add_parser("list", help="list issued certificates")
    s.add_argument("--live", action="store_true", help="hide revoked certificates")
    s.set_defaults(func=cmd_cert_list)
    s = csub.add_parser("revoke", help="revoke by serial (hex) or identity (hausmeister:ROLE:NAME)")
    s.add_argument("target", metavar="SERIAL|IDENTITY")
    s.add_argument("--reason", default="", help="recorded with the revocation")
    s.set_defaults(func=cmd_cert_revoke)
    s = csub.add_parser("install", help="use an operator's own CA and/or server certificate")
    s.add_argument("--ca-cert", required=True, help="PEM file with the CA certificate")
    s.add_argument("--ca-key", help="PEM file with the CA key (needed to enroll modules)")
    s.add_argument("--server-cert", help="PEM file: server certificate, then intermediates")
    s.add_argument("--server-key", help="PEM file with the server certificate's key")
    s.add_argument("--replace-ca", action="store_true",
                   help="replace an installed CA (all modules must enroll again)")
    s.set_defaults(func=cmd_cert_install)

    user = sub.add_parser("user", help="users: add, list, passwd, disable, role")
    usub = user.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    s = usub.add_parser("add", help="add a user")
    s.add_argument("name")
    s.add_argument("--role", required=True, help="admin, supporter or auditor")
    s.add_argument("--tenant", default="default")
    s.add_argument("--email")
    pw = s.add_mutually_exclusive_group()
    pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    pw.add_argument("--generate-password", action="store_true", help="generate and print one")
    s.set_defaults(func=cmd_user_add)
    s = usub.add_parser("list", help="list users")
    s.set_defaults(func=cmd_user_list)
    s = usub.add_parser("passwd", help="set a user's password (also lifts a lock-out)")
    s.add_argument("name")
    pw = s.add_mutually_exclusive_group()
    pw.add_argument("--password-stdin", action="store_true")
    pw.add_argument("--generate-password", action="store_true")
    s.set_defaults(func=cmd_user_passwd)
    s = usub.add_parser("disable", help="disable a user (or --enable again)")
    s.add_argument("name")
    s.add_argument("--enable", action="store_true")
    s.set_defaults(func=cmd_user_disable)
    s = usub.add_parser("role", help="change a user's role")
    s.add_argument("name")
    s.add_argument("role", help="admin, supporter or auditor")
    s.set_defaults(func=cmd_user_role)

    s = usub.add_parser("groups", help="show or change which host groups a supporter may reach")
    s.add_argument("name")
    s.add_argument("--add", action="append", metavar="GROUP", help="grant a group (repeatable)")
    s.add_argument("--remove", action="append", metavar="GROUP", help="withdraw a group (repeatable)")
    s.set_defaults(func=cmd_user_groups)

    node = sub.add_parser("node", help="several server nodes: which nodes and relay processes "
                          "share this database")
    nsub = node.add_subparsers(dest="node_command", metavar="ACTION", required=True)
    s = nsub.add_parser("list", help="server nodes and relay processes: live or dead (no "
                        "heartbeat for cluster.node_timeout_seconds), hosts, relayed sessions")
    s.set_defaults(func=cmd_node_list)

    sess = sub.add_parser("session", help="session records")
    ssub = sess.add_subparsers(dest="session_command", metavar="ACTION", required=True)
    s = ssub.add_parser("list", help="list recent sessions, newest first")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_session_list)

    proto = sub.add_parser("protocol", help="session protocols: verify the hash chains, show one")
    psub = proto.add_subparsers(dest="protocol_command", metavar="ACTION", required=True)
    s = psub.add_parser("verify", help="check the hash chain of a protocol file, or of every "
                        "*.jsonl in a folder, and each file's end against the database "
                        "(exit 1 names the first bad line)")
    s.add_argument("path", metavar="FILE|DIR")
    s.add_argument("--no-db", action="store_true",
                   help="check the hash chains only (a copy of the files, no database at hand)")
    s.set_defaults(func=cmd_protocol_verify)
    s = psub.add_parser("show", help="print a session's protocol as a readable timeline")
    s.add_argument("session", metavar="SESSION_ID")
    s.set_defaults(func=cmd_protocol_show)

    mail = sub.add_parser("mail", help="mail through the operator's SMTP relay: test, status")
    msub = mail.add_subparsers(dest="mail_command", metavar="ACTION", required=True)
    s = msub.add_parser("test", help="queue a test mail; the running server delivers it")
    s.add_argument("address")
    s.set_defaults(func=cmd_mail_test)
    s = msub.add_parser("status", help="how many mails are queued, sent and failed")
    s.set_defaults(func=cmd_mail_status)

    tenant = sub.add_parser("tenant", help="tenants (organisations): add, list")
    tsub = tenant.add_subparsers(dest="tenant_command", metavar="ACTION", required=True)
    s = tsub.add_parser("add", help="add a tenant")
    s.add_argument("name")
    s.set_defaults(func=cmd_tenant_add)
    s = tsub.add_parser("list", help="list tenants")
    s.set_defaults(func=cmd_tenant_list)

    group = sub.add_parser("group", help="host groups: add, list")
    gsub = group.add_subparsers(dest="group_command", metavar="ACTION", required=True)
    s = gsub.add_parser("add", help="add a host group")
    s.add_argument("name")
    s.add_argument("--tenant", default="default")
    s.set_defaults(func=cmd_group_add)
    s = gsub.add_parser("list", help="list host groups")
    s.set_defaults(func=cmd_group_list)

    host = sub.add_parser("host", help="enrolled hosts: list, remove")
    hsub = host.add_subparsers(dest="host_command", metavar="ACTION", required=True)
    s = hsub.add_parser("list", help="list enrolled hosts")
    s.set_defaults(func=cmd_host_list)
    s = hsub.add_parser("remove", help="remove a host: revokes its certificates and ends its "
                        "live sessions")
    s.add_argument("host", metavar="NAME|ID")
    s.set_defaults(func=cmd_host_remove)

    token = sub.add_parser("token", help="one-time host enrollment tokens")
    ksub = token.add_subparsers(dest="token_command", metavar="ACTION", required=True)
    s = ksub.add_parser("create", help="create a single-use, expiring host enrollment token")
    s.add_argument("--group", help="host group the enrolled host joins")
    s.add_argument("--tenant", default="default")
    s.add_argument("--ttl", help="lifetime such as 15m, 1h, 7d (default: security.token_default_ttl)")
    s.add_argument("-q", "--quiet", action="store_true", help="print only the token")
    s.set_defaults(func=cmd_token_create)

    from .backup import add_commands as add_backup_commands
    add_backup_commands(sub)
    from .download_signing import add_commands as add_download_commands
    add_download_commands(sub)
    from .recordings.cli import add_commands as add_recording_commands
    add_recording_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load(_config_path(args.config))
        return args.func(config, args)
    except ConfigError as exc:
        print(f"hausmeister-server: error: {exc}", file=sys.stderr)
        return 2
    except (CLIError, DatabaseError, pki.PKIError) as exc:
        print(f"hausmeister-server: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
