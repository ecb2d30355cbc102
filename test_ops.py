"""Operations (issue 6): authd driven as systemd drives it, its units, its logs, and
the migration from htpasswd files and from the Express auth-server.

Every test runs the real authd.py as a subprocess. Socket activation is done the way
systemd does it: the listening socket is fd 3, LISTEN_FDS=1 and LISTEN_PID is the
child's own pid (conftest's Authd, with a small exec wrapper); sd_notify messages go to a
unix datagram socket the test binds, and the test checks the sender's pid as
NotifyAccess=main would.
"""
import configparser
import ctypes
import ctypes.util
import http.client
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import fast_hash, need, run_cli, tcp_sockets, users_line, wait_until, write_users

HERE = Path(__file__).resolve().parent
UNIT = HERE / "auth.service"
SOCKET_UNIT = HERE / "auth.socket"
DROPIN = HERE / "contrib" / "systemd" / "socket-activation.conf"
F2B_FILTER = HERE / "contrib" / "fail2ban" / "authd.conf"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
STRACE = shutil.which("strace")
HTPASSWD = shutil.which("htpasswd")
FAIL2BAN_REGEX = shutil.which("fail2ban-regex")


# ---------------------------------------------------------------------------
# helpers: sockets, sd_notify receiver (authd launched as systemd does: conftest's Authd)
# ---------------------------------------------------------------------------

@pytest.fixture
def sockdir():
    """A short directory for unix sockets (sun_path is limited to 107 bytes)."""
    d = tempfile.mkdtemp(prefix="authd-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def notify(sockdir):
    """The service manager's end of sd_notify; authd gets NOTIFY_SOCKET=notify.address."""
    n = Notify(str(sockdir / "notify"))
    yield n
    n.close()


def tcp_listener(host="127.0.0.1"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(64)
    return s


def unix_listener(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(64)
    return s


class Notify:
    """The service manager's side of sd_notify: a unix datagram socket with SO_PASSCRED."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if address.startswith("@"):
            self.sock.bind("\0" + address[1:])
        else:
            self.sock.bind(address)
        self.address = address
        self.messages = []  # (pid, {key: value}, raw)

    def receive(self, timeout=15):
        self.sock.settimeout(timeout)
        data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        text = data.decode("utf-8")
        fields = {}
        for line in text.split("\n"):
            if line:
                key, sep, value = line.partition("=")
                assert sep, "sd_notify line without '=': %r" % text
                fields[key] = value
        self.messages.append((pid, fields, text))
        return pid, fields

    def until(self, key, value="1", timeout=15):
        """Messages received up to and including the first one carrying key=value."""
        got = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no %s=%s; got %r" % (key, value, [m[2] for m in got]))
            try:
                pid, fields = self.receive(left)
            except socket.timeout:
                raise AssertionError("no %s=%s; got %r" % (key, value, [m[2] for m in got]))
            got.append((pid, fields, self.messages[-1][2]))
            if fields.get(key) == value:
                return got

    def close(self):
        self.sock.close()


def listening_tcp_ports(pid):
    """TCP ports the process `pid` listens on (its fds matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        m = re.match(r"socket:\[(\d+)\]$", target)
        if m:
            inodes.add(m.group(1))
    return sorted(local for local, _, state, _, inode in tcp_sockets() if state == "0A" and inode in inodes)


def default_cost_hash(password):
    """A hash as `authd.py hash` makes it: the production cost (scrypt ln=17)."""
    r = run_cli("hash", input=password + "\n")
    assert r.returncode == 0, r.stderr
    h = r.stdout.strip().splitlines()[-1]
    assert h.startswith("$scrypt$"), h
    return h


# ---------------------------------------------------------------------------
# 1. the units
# ---------------------------------------------------------------------------

def parse_unit(*paths):
    """{(section, key): [values...]} with systemd's "empty assignment resets" rule."""
    out = {}
    section = None
    for path in paths:
        for raw in Path(path).read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                continue
            key, _, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if value == "":
                out[(section, key)] = []
            else:
                out.setdefault((section, key), []).append(value)
    return out


def analyze_security(unitdir, name="auth.service"):
    r = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=true", name], cwd=str(unitdir),
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for %s: (\d+\.\d+)" % re.escape(name), r.stdout)
    assert m, "no score in systemd-analyze output:\n%s\n%s" % (r.stdout, r.stderr)
    return float(m.group(1)), r.stdout


def unit_dir(tmp_path, socket_activated):
    d = tmp_path / "units"
    d.mkdir()
    shutil.copy(UNIT, d / "auth.service")
    shutil.copy(SOCKET_UNIT, d / "auth.socket")
    if socket_activated:
        (d / "auth.service.d").mkdir()
        shutil.copy(DROPIN, d / "auth.service.d" / DROPIN.name)
    return d


def test_service_unit_is_complete():
    u = parse_unit(UNIT)
    svc = lambda key: u.get(("Service", key), [])
    assert svc("Type") == ["notify"]
    assert svc("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert svc("Restart") == ["on-failure"]
    (execstart,) = svc("ExecStart")
    argv = execstart.split()
    assert argv[0].endswith("python3") and argv[1] == "/opt/authd/authd.py", execstart
    users = Path(argv[argv.index("--users") + 1])
    assert svc("User") == ["authd"] or svc("DynamicUser") == ["yes"]
    # authd writes the users file's folder (temp + lock files) and its state directory only.
    writable = [Path(p.lstrip("-")) for v in svc("ReadWritePaths") for p in v.split()]
    writable += [Path("/var/lib") / p for v in svc("StateDirectory") for p in v.split()]
    assert users.parent in writable, (users, writable)
    secret = [v.split("=", 1)[1] for e in svc("Environment") for v in e.split()
              if v.startswith("AUTH_SECRET_FILE=")]
    assert secret and Path(secret[0]).parent in writable
    assert svc("ProtectSystem") == ["strict"]
    assert svc("NoNewPrivileges") == ["yes"]
    assert svc("SyslogIdentifier") == ["authd"]  # what the fail2ban filter expects
    # The socket-activated variant: auth.socket + a drop-in that takes the network away.
    s = parse_unit(SOCKET_UNIT)
    listen = s[("Socket", "ListenStream")]
    assert listen in (["127.0.0.1:3003"],) or listen[0].startswith("/"), listen
    d = parse_unit(UNIT, DROPIN)
    assert d[("Service", "PrivateNetwork")] == ["yes"]
    assert d[("Service", "RestrictAddressFamilies")] == ["AF_UNIX"]
    assert "auth.socket" in d[("Unit", "Requires")]


@pytest.mark.parametrize("socket_activated, bound", [(False, 1.5), (True, 1.0)], ids=["tcp", "socket_activated"])
def test_systemd_analyze_security_score(tmp_path, socket_activated, bound):
    need(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    score, out = analyze_security(unit_dir(tmp_path, socket_activated=socket_activated))
    assert score <= bound, out
    if socket_activated:
        assert re.search(r"PrivateNetwork=\s+Service has no access to the host's network", out), out


def test_systemd_analyze_verify(tmp_path):
    need(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    for activated in (False, True):
        sub = tmp_path / ("socket" if activated else "plain")
        sub.mkdir()
        d = unit_dir(sub, socket_activated=activated)
        r = subprocess.run([SYSTEMD_ANALYZE, "verify", "auth.service", "auth.socket"],
                           cwd=str(d), capture_output=True, text=True, timeout=60)
        complaints = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()
                      # /usr/bin/python3 may live elsewhere on a build machine
                      and not re.search(r"Command \S+ is not executable", line)]
        assert not complaints, r.stdout + r.stderr


def test_service_unit_commands_run(tmp_path, authd, notify):
    """auth.service's own ExecStart=, Environment=, UMask= and ExecReload=, with its
    paths moved under tmp: authd starts as the unit starts it, makes its secret in the
    state directory, rewrites the users file in the configuration directory, reloads
    on `kill -HUP $MAINPID` and stops cleanly."""
    u = parse_unit(UNIT)
    svc = lambda key: u.get(("Service", key), [])
    root = tmp_path / "root"
    move = lambda p: str(root) + p if p.startswith(("/etc/", "/var/", "/run/")) else p
    (execstart,) = svc("ExecStart")
    argv = [move(a) for a in execstart.split()]
    assert argv[1] == "/opt/authd/authd.py"
    environ = {}
    for line in svc("Environment"):
        for assignment in line.split():
            key, _, value = assignment.partition("=")
            environ[key] = move(value)
    users = Path(argv[argv.index("--users") + 1])
    env_file = Path(argv[argv.index("--env") + 1])
    secret = Path(environ["AUTH_SECRET_FILE"])
    for folder in {users.parent, env_file.parent}:
        folder.mkdir(parents=True, exist_ok=True, mode=0o750)
    secret.parent.mkdir(parents=True, mode=0o700)
    env_file.write_text("AUTH_PORT=0\n")  # the unit binds 127.0.0.1:3003; tests take any port
    write_users(users, ["# users", "alice:first-password:admin"], mode=0o640)
    d = authd(workdir="/", command=argv[2:], secret=None, env=environ, notify=notify.address,
              umask=int(svc("UMask")[0], 8))
    msgs = notify.until("READY")
    assert msgs[-1][0] == d.proc.pid
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert len(secret.read_text().strip()) >= 32
    line = users_line(users, "alice")
    assert line.split(":")[1].startswith("$scrypt$") and line.endswith(":admin"), line
    assert users.read_text().startswith("# users\n")
    assert stat.S_IMODE(os.stat(users).st_mode) == 0o640
    (reload_cmd,) = svc("ExecReload")
    reload_argv = reload_cmd.replace("$MAINPID", str(d.proc.pid)).split()
    need(os.access(reload_argv[0], os.X_OK), reload_argv[0] + " is missing")
    subprocess.run(reload_argv, check=True, timeout=10)
    msgs = notify.until("READY")
    assert any(f.get("RELOADING") == "1" for _, f, _ in msgs), msgs
    d.proc.send_signal(signal.SIGTERM)
    notify.until("STOPPING")
    assert d.proc.wait(15) == 0
    assert "Traceback" not in d.log(), d.log()


def syscall_filter_sets():
    """Expand the unit's SystemCallFilter= with systemd-analyze's own group tables."""
    out = subprocess.run([SYSTEMD_ANALYZE, "syscall-filter"], capture_output=True,
                         text=True, timeout=60).stdout
    groups, cur = {}, None
    for line in out.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line.startswith(" ") and s.startswith("@"):
            cur = s.split()[0]
            groups[cur] = set()
        elif cur:
            groups[cur].add(s.split()[0])

    def expand(name, seen=()):
        if not name.startswith("@"):
            return {name}
        res = set()
        for item in groups.get(name, ()):
            if item not in seen:
                res |= expand(item, seen + (name,))
        return res

    allowed = None
    for value in parse_unit(UNIT)[("Service", "SystemCallFilter")]:
        deny = value.startswith("~")
        names = set()
        for item in value.lstrip("~").split():
            names |= expand(item)
        if allowed is None:
            assert not deny, "the unit's filter should be an allow list"
            allowed = names
        elif deny:
            allowed -= names
        else:
            allowed |= names
    return allowed


def strace_syscalls(path):
    calls = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        m = re.match(r"(?:\d+\s+)?(?:<\.\.\. )?([a-z_0-9]+)(?:\(| resumed>)", line)
        if m:
            calls.setdefault(m.group(1), []).append(line)
    return calls


@pytest.mark.parametrize("mode", ["systemd-socket", "auth-socket", "tcp"])
def test_service_unit_sandbox_allows_what_authd_does(tmp_path, authd, sockdir, notify, mode):
    """authd's real system calls (under strace) for a day's work, checked against the
    unit: SystemCallFilter=, MemoryDenyWriteExecute=, and, socket-activated, the
    drop-in's RestrictAddressFamilies=AF_UNIX. A call these forbid would fail with
    EPERM (or EAFNOSUPPORT) in production only."""
    need(SYSTEMD_ANALYZE, "systemd-analyze is not installed")
    need(STRACE, "strace is not installed")
    allowed = syscall_filter_sets()
    assert {"read", "accept4", "flock", "rename", "fchmod"} <= allowed
    assert not {"fchown", "setrlimit", "setuid", "chroot"} & allowed
    sha512 = libcrypt_hash("pw2", "$6$")
    users = ["alice:" + fast_hash("pw1") + ":admin"]
    if sha512:
        users.append("bob:" + sha512)  # upgraded at login: libcrypt via ctypes + rewrite
    trace = tmp_path / "strace.txt"
    env = {"AUTH_BYPASS": "bypass-value-1234-at-least-32-characters"}
    listener, args = None, ()
    if mode == "systemd-socket":
        listener = tcp_listener()
    elif mode == "auth-socket":
        env["AUTH_SOCKET"] = str(sockdir / "authd.sock")
    else:
        args = ("--port", "0")
    d = authd(users=users, listen=listener, notify=notify.address, journal=True, env=env, args=args,
              wrap=[STRACE, "-f", "-qq", "-o", str(trace)])
    (pid, _, _), = notify.until("READY")[-1:]  # the traced authd itself, not strace
    req = d.request
    r = req("POST", "/__auth/login", body={"username": "alice", "password": "pw1"})
    assert r.status == 200, r
    token = r.cookie()
    assert req("POST", "/__auth/login", body={"username": "alice", "password": "no"}).status == 401
    if sha512:
        assert req("POST", "/__auth/login", body={"username": "bob", "password": "pw2"}).status == 200
        wait_until(lambda: users_line(d.users_file, "bob").split(":")[1].startswith("$scrypt$"),
                   what="bob's hash upgrade")
    assert req("GET", "/__auth/auth", headers={"Cookie": "authToken=" + token}).status == 200
    assert req("GET", "/__auth/admin", headers={"X-Auth-Bypass": "bypass-value-1234-at-least-32-characters"}).status == 200
    os.kill(pid, signal.SIGHUP)
    notify.until("READY")
    os.kill(pid, signal.SIGTERM)
    notify.until("STOPPING")
    assert d.proc.wait(30) == 0, d.log()  # strace exits with authd's status
    if listener:
        listener.close()
    calls = strace_syscalls(trace)
    assert "execve" in calls and ("accept4" in calls or "accept" in calls), sorted(calls)
    forbidden = sorted(set(calls) - allowed)
    assert not forbidden, {name: calls[name][:3] for name in forbidden}
    # MemoryDenyWriteExecute=yes: no W+X mapping, no mprotect() adding PROT_EXEC.
    wx = [l for l in calls.get("mmap", []) if re.search(r"PROT_WRITE\|PROT_EXEC|PROT_EXEC\|PROT_WRITE", l)]
    mx = [l for n in ("mprotect", "pkey_mprotect") for l in calls.get(n, []) if "PROT_EXEC" in l]
    assert not wx and not mx, wx + mx
    families = {m.group(1) for l in calls.get("socket", []) for m in [re.search(r"socket\((AF_\w+)", l)] if m}
    unit_families = set(" ".join(parse_unit(UNIT)[("Service", "RestrictAddressFamilies")]).split())
    assert families <= unit_families, calls.get("socket")
    if mode == "systemd-socket":
        # with the socket passed in, AF_UNIX (sd_notify) is all it needs: the drop-in's rule
        assert families <= {"AF_UNIX"}, calls.get("socket")


# ---------------------------------------------------------------------------
# 2. socket activation and sd_notify
# ---------------------------------------------------------------------------

def test_socket_activation_tcp(authd, notify):
    listener = tcp_listener()
    port = listener.getsockname()[1]
    d = authd(users=["alice:" + fast_hash("pw1")], listen=listener, notify=notify.address, args=())
    msgs = notify.until("READY")
    # NotifyAccess=main: every message comes from the main process itself
    assert all(pid == d.proc.pid for pid, _, _ in msgs), (d.proc.pid, msgs)
    assert d.port == port
    r = d.request("GET", "/__auth/healthz")
    assert r.status == 200 and r.body.strip() == b"ok", r
    r = d.request("POST", "/__auth/login", body={"username": "alice", "password": "pw1"})
    assert r.status == 200 and r.json() == {"status": "ok", "user": "alice"}, r
    # it serves on the socket it was given and opened no listening socket of its own
    assert listening_tcp_ports(d.proc.pid) == [port]
    assert len(re.findall(r"listening on", d.log())) == 1, d.log()
    listener.close()
    assert d.stop() == 0, d.log()


def test_socket_activation_unix(authd, sockdir):
    path = sockdir / "authd.sock"
    listener = unix_listener(path)
    d = authd(users=["alice:" + fast_hash("pw1")], listen=listener, args=())
    assert d.unix_path == str(path), d.log()
    r = d.request("GET", "/__auth/healthz")
    assert r.status == 200, r
    # a unix peer is nginx: X-Real-IP names the client, in the log too
    r = d.request("POST", "/__auth/login",
                     headers={"X-Real-IP": "198.51.100.4"},
                     body={"username": "alice", "password": "wrong"})
    assert r.status == 401 and r.json() == {"status": "fail", "message": "Invalid credentials"}, r
    d.wait_log(r'login failed from 198\.51\.100\.4 user="alice"')
    assert listening_tcp_ports(d.proc.pid) == []
    listener.close()
    assert d.stop() == 0, d.log()


def test_listen_fds_for_another_process_are_ignored(authd):
    """LISTEN_PID names someone else (e.g. inherited from a parent): authd binds itself."""
    listener = tcp_listener()
    passed = listener.getsockname()[1]
    d = authd(users=["alice:" + fast_hash("pw1")], listen=listener, listen_pid=1, args=("--port", "0"))
    assert d.port != passed
    r = d.request("GET", "/__auth/healthz")
    assert r.status == 200, r
    assert d.port in listening_tcp_ports(d.proc.pid)
    listener.close()
    assert d.stop() == 0


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notify_ready_reloading_stopping(authd, sockdir, kind):
    address = str(sockdir / "notify") if kind == "path" else "@authd-test-%d-%d" % (os.getpid(), time.monotonic_ns())
    notify = Notify(address)
    d = authd(users=["alice:" + fast_hash("pw1")], notify=address)
    msgs = notify.until("READY")
    assert not any("RELOADING" in f or "STOPPING" in f for _, f, _ in msgs), msgs
    assert all(pid == d.proc.pid for pid, _, _ in msgs), msgs
    # READY=1 means it serves now
    r = d.request("GET", "/__auth/healthz")
    assert r.status == 200, r

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    d.proc.send_signal(signal.SIGHUP)
    msgs = notify.until("READY")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading = [f for _, f, _ in msgs if f.get("RELOADING") == "1"]
    assert len(reloading) == 1, msgs
    # MONOTONIC_USEC travels in the same datagram as RELOADING=1 (sd_notify(3))
    usec = int(reloading[0]["MONOTONIC_USEC"])
    assert before <= usec <= after, (before, usec, after)
    assert msgs[-1][1].get("READY") == "1" and "RELOADING" not in msgs[-1][1], msgs
    assert all(pid == d.proc.pid for pid, _, _ in msgs), msgs

    d.proc.send_signal(signal.SIGTERM)
    msgs = notify.until("STOPPING")
    assert all(pid == d.proc.pid for pid, _, _ in msgs), msgs
    assert d.proc.wait(15) == 0, d.log()
    notify.close()


def stealth_rewrite(path, text):
    """Rewrite the users file in place keeping size, inode and mtime, so only SIGHUP
    (not the mtime watcher) can notice."""
    st = os.stat(path)
    data = text.encode()
    assert len(data) == st.st_size, (len(data), st.st_size)
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_sighup_reloads_users_file_and_env(authd, notify):
    old, new = fast_hash("old-password"), fast_hash("new-password")
    assert len(old) == len(new)
    d = authd(users=["alice:" + old], notify=notify.address)
    notify.until("READY")
    req = d.request
    token = d.login("alice", "old-password")
    assert req("GET", "/__auth/auth", headers={"X-Auth-Bypass": "reloaded-bypass-1-at-least-32-characters"}).status == 401

    stealth_rewrite(d.users_file, "alice:" + new + "\n")
    d.env_file.write_text("AUTH_BYPASS=reloaded-bypass-1-at-least-32-characters\n")
    d.proc.send_signal(signal.SIGHUP)
    notify.until("READY")
    # in force as soon as authd says it is ready again
    assert req("POST", "/__auth/login", body={"username": "alice", "password": "new-password"}).status == 200
    assert req("POST", "/__auth/login", body={"username": "alice", "password": "old-password"}).status == 401
    r = req("GET", "/__auth/auth", headers={"X-Auth-Bypass": "reloaded-bypass-1-at-least-32-characters"})
    assert r.status == 200 and "x-auth-user" not in r.headers, r
    assert d.auth(token).status == 401, "a token made with the old hash outlived the reload"
    assert d.stop() == 0, d.log()


def test_sighup_with_broken_users_file_keeps_serving(authd, notify):
    d = authd(users=["# users", "alice:" + fast_hash("pw1")], notify=notify.address)
    notify.until("READY")
    req = d.request
    token = req("POST", "/__auth/login", body={"username": "alice", "password": "pw1"}).cookie()
    assert token
    with open(d.users_file, "a") as f:
        f.write("bob:" + fast_hash("pw2") + "\nthis line is broken\n")
    d.proc.send_signal(signal.SIGHUP)
    # systemd must not be left in "reloading": READY=1 follows RELOADING=1 even on failure
    notify.until("READY")
    d.wait_log(r"(?m)^.*%s.*\b4\b.*$" % re.escape(str(d.users_file.name)))
    assert "Traceback" not in d.log(), d.log()
    assert d.proc.poll() is None
    assert req("GET", "/__auth/auth", headers={"Cookie": "authToken=" + token}).status == 200
    assert req("POST", "/__auth/login", body={"username": "bob", "password": "pw2"}).status == 401
    assert d.stop() == 0, d.log()


def test_sigterm_drains_requests_in_flight(authd, notify):
    """Slow (production-cost) logins are in flight when SIGTERM arrives: each one gets its
    answer, new connections are refused at once, and authd exits 0."""
    n = 3  # two hash at once (HASH_SLOTS), one waits for a slot
    d = authd(users=["alice:" + default_cost_hash("slow-pw")], notify=notify.address, env={"AUTH_LOGIN_RATE": "100/60"})
    notify.until("READY")
    port = d.port
    conns = []
    for i in range(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.connect()
        body = json.dumps({"username": "alice", "password": "slow-pw"})
        c.request("POST", "/__auth/login", body=body, headers={"Content-Type": "application/json"})
        conns.append(c)
    # a later connection answered => all earlier ones were accepted (the accept queue is FIFO)
    assert d.request("GET", "/__auth/healthz").status == 200
    # in flight: authd has read each request (its end of each connection has nothing left unread)
    clients = sorted(c.sock.getsockname()[1] for c in conns)
    wait_until(lambda: sorted(remote for local, remote, _, unread, _ in tcp_sockets()
                              if local == port and remote in clients and unread == 0) == clients,
               what="authd to read the three requests")
    results = [None] * n

    def finish(i):
        try:
            resp = conns[i].getresponse()
            results[i] = (resp.status, resp.getheader("Set-Cookie"), resp.read())
        except Exception as e:  # noqa: BLE001 - reported below
            results[i] = e

    threads = [threading.Thread(target=finish, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    d.proc.send_signal(signal.SIGTERM)
    notify.until("STOPPING")
    # stops accepting: a new connection is refused while the logins are still running
    refused_while_busy = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = any(t.is_alive() for t in threads)
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            s.close()
        except (ConnectionRefusedError, ConnectionResetError):
            # reset: our SYN was queued on the listener just as authd closed it
            refused_while_busy = busy
            break
        time.sleep(0.01)
    for t in threads:
        t.join(30)
    assert d.proc.wait(15) == 0, d.log()
    for res in results:
        assert isinstance(res, tuple) and res[0] == 200 and "authToken=" in (res[1] or ""), (results, d.log())
    assert refused_while_busy is True, "new connections were still accepted during the drain"
    assert "Traceback" not in d.log(), d.log()


# ---------------------------------------------------------------------------
# 3. AUTH_SOCKET
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", [None, "0600"])
def test_auth_socket_listens_on_unix_socket(authd, sockdir, mode):
    path = sockdir / "authd.sock"
    env = {"AUTH_SOCKET": str(path)}
    if mode:
        env["AUTH_SOCKET_MODE"] = mode
    d = authd(users=["alice:" + fast_hash("pw1")], env=env, args=())
    assert d.unix_path == str(path), d.log()
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == int(mode or "0660", 8)
    r = d.request("POST", "/__auth/login", body={"username": "alice", "password": "pw1"})
    assert r.status == 200 and r.cookie(), r
    r = d.request("GET", "/__auth/auth", headers={"Cookie": "authToken=" + r.cookie()})
    assert r.status == 200 and r.headers.get("x-auth-user") == "alice", r
    assert listening_tcp_ports(d.proc.pid) == []
    assert d.stop() == 0, d.log()


def test_auth_socket_replaces_stale_socket_file(authd, sockdir):
    """After a crash (kill -9) the socket file is left behind; the restart must not fail."""
    path = sockdir / "authd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    d = authd(users=["alice:" + fast_hash("pw1")], env={"AUTH_SOCKET": str(path)}, args=())
    assert d.unix_path == str(path) and d.request("GET", "/__auth/healthz").status == 200
    assert d.stop() == 0, d.log()


# ---------------------------------------------------------------------------
# 4. logs: journald levels, no secrets, fail2ban
# ---------------------------------------------------------------------------

def test_journal_stream_level_prefixes(authd):
    d = authd(users=["alice:" + fast_hash("pw1")], journal=True)
    req = d.request
    assert req("POST", "/__auth/login", body={"username": "alice", "password": "pw1"}).status == 200
    assert req("POST", "/__auth/login", body={"username": "mallory", "password": "x"}).status == 401
    d.wait_log(r'login failed from 127\.0\.0\.1 user="mallory"')
    with open(d.users_file, "a") as f:
        f.write("broken line\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log(r"users\.txt.*\b2\b")
    assert d.stop() == 0
    lines = [l.rstrip("\n") for l in d.lines() if l.strip()]
    assert lines, d.log()
    bad = [l for l in lines if not re.match(r"<[0-7]>authd: \S", l)]
    assert not bad, lines
    (listen,) = [l for l in lines if "listening on" in l]
    assert listen.startswith("<6>"), listen
    (failed,) = [l for l in lines if "login failed" in l]
    assert failed[1] in "45", failed  # warning or notice
    broken = [l for l in lines if "users.txt" in l and re.search(r"\b2\b", l)]
    assert broken and all(int(l[1]) <= 4 for l in broken), lines  # an error or warning


def test_logs_never_carry_secrets(authd, tmp_path):
    """No secret, password or full token in the log: logins good and bad, bypass, cookies
    valid and forged, logout. The secret is the generated one in AUTH_SECRET_FILE."""
    secret_file = tmp_path / "state" / "secret"
    secret_file.parent.mkdir()
    bypass = "Bypass-Value-For-Tests-0123456789"
    passwords = ["Correct Horse 1", "wrong-Password-2", "pw-of-nobody-3"]
    d = authd(users=["alice:" + fast_hash(passwords[0]) + ":admin"], secret=None, journal=True,
              env={"AUTH_SECRET_FILE": str(secret_file), "AUTH_BYPASS": bypass})
    req = d.request
    r = req("POST", "/__auth/login", body={"username": "alice", "password": passwords[0]})
    assert r.status == 200
    token = r.cookie()
    r = req("POST", "/__auth/login", body="username=alice&password=" + passwords[0].replace(" ", "+"),
            headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 303
    token2 = r.cookie()
    assert req("POST", "/__auth/login", body={"username": "alice", "password": passwords[1]}).status == 401
    assert req("POST", "/__auth/login", body={"username": "nobody", "password": passwords[2]}).status == 401
    assert req("GET", "/__auth/auth", headers={"X-Auth-Bypass": bypass}).status == 200
    assert req("GET", "/__auth/auth", headers={"X-Auth-Bypass": bypass + "x"}).status == 401
    assert req("GET", "/__auth/admin", headers={"Cookie": "authToken=" + token}).status == 200
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert req("GET", "/__auth/auth", headers={"Cookie": "authToken=" + forged}).status == 401
    assert req("GET", "/__auth/logout", headers={"Cookie": "authToken=" + token2}).status in (200, 303)
    assert d.stop() == 0
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    log = d.log()
    for needle in [secret, bypass] + passwords + [passwords[0].replace(" ", "+")]:
        assert needle not in log, (needle, log)
    for t in (token, token2, forged):
        assert t not in log, log
        assert t.rsplit(".", 1)[1] not in log, log  # not even the signature
        assert t.split(".")[1] not in log, log  # nor the claims segment
    assert "login failed" in log


def failregex_from_filter():
    cp = configparser.RawConfigParser()
    cp.read(F2B_FILTER)
    return cp.get("Definition", "failregex").strip()


def python_failregex():
    """The filter's regex for Python's re: fail2ban's syslog prefix reduced to its essence
    (host, daemon[pid]:) and <HOST> to an IPv4/IPv6 address."""
    rx = failregex_from_filter()
    rx = rx.replace("%(__prefix_line)s", r"(?:\S+ \S+ \S+ \S+ \S+\[\d+\]:\s+)?")
    rx = rx.replace("<HOST>", r"(?P<host>[0-9.]+|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]+)")
    assert "%(" not in rx and "<" not in rx.replace("(?P<host>", "").replace("<[0-7]>", ""), rx
    return re.compile(rx)


def failed_login_log(authd):
    """authd's real log after failed logins from an IPv4, an IPv6 and a hostile user name."""
    d = authd(users=["alice:" + fast_hash("pw1")], journal=False)
    req = d.request
    hostile = 'x" user="y\nauthd: login failed from 10.6.6.6 user="z'
    cases = [("203.0.113.9", "bob"), ("2001:db8::7", "carol"), ("198.51.100.23", hostile)]
    for addr, name in cases:
        r = req("POST", "/__auth/login", headers={"X-Real-IP": addr},
                body={"username": name, "password": "wrong"})
        assert r.status == 401, r
    assert req("POST", "/__auth/login", body={"username": "alice", "password": "pw1"}).status == 200
    d.wait_log(r"login failed from 198\.51\.100\.23")
    assert d.stop() == 0
    return d.lines(), [a for a, _ in cases]


def test_fail2ban_regex_python(authd):
    rx = python_failregex()
    lines, addrs = failed_login_log(authd)
    found = []
    for line in lines:
        for variant in (line.rstrip("\n"),
                        "Nov 29 02:44:01 web1 authd[812]: " + line.rstrip("\n"),
                        "<4>" + line.rstrip("\n")):
            m = rx.search(variant)
            if m:
                found.append(m.group("host"))
    # each failure matched in all three forms, the hostile name forged nothing
    assert sorted(found) == sorted(addrs * 3), (found, lines)
    assert "10.6.6.6" not in found
    assert len([l for l in lines if "login failed" in l]) == 3, lines


def test_fail2ban_regex_tool(authd, tmp_path):
    need(FAIL2BAN_REGEX, "fail2ban-regex is not installed (Debian package fail2ban)")
    lines, addrs = failed_login_log(authd)
    # as the journal (SyslogIdentifier=authd) or a syslog file shows authd's lines
    log = tmp_path / "authd.log"
    log.write_text("".join("Nov 29 02:44:%02d web1 authd[812]: %s" % (i, l)
                           for i, l in enumerate(lines)))
    conf = tmp_path / "fail2ban" / "filter.d"
    conf.mkdir(parents=True)
    shutil.copy(F2B_FILTER, conf / "authd.conf")
    os.symlink("/etc/fail2ban/filter.d/common.conf", conf / "common.conf")
    r = subprocess.run([FAIL2BAN_REGEX, "--out", "ip", str(log), str(conf / "authd.conf")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(r.stdout.split()) == sorted(addrs), r.stdout + r.stderr
    r = subprocess.run([FAIL2BAN_REGEX, str(log), str(conf / "authd.conf")],
                       capture_output=True, text=True, timeout=60)
    assert re.search(r"Lines: %d lines, 0 ignored, 3 matched" % len(lines), r.stdout), r.stdout


# ---------------------------------------------------------------------------
# 5-7. migration: htpasswd files, import-htpasswd, the Express auth-server
# ---------------------------------------------------------------------------

def htpasswd_supports(flag):
    r = subprocess.run([HTPASSWD, "-nb", flag, "u", "p"], capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.startswith("u:")


def make_htpasswd(path, entries):
    """entries: (name, password, flags) -> a file written by the real htpasswd."""
    first = True
    for name, pw, flags in entries:
        args = [HTPASSWD, "-b"] + (["-c"] if first else []) + list(flags) + [str(path), name, pw]
        r = subprocess.run(args, capture_output=True, text=True)
        assert r.returncode == 0, (args, r.stderr)
        first = False
    return path


def libcrypt_hash(password, prefix):
    """A hash made by this system's libcrypt (libxcrypt): as other tools write them."""
    name = ctypes.util.find_library("crypt")
    if not name:
        return None
    lib = ctypes.CDLL(name)
    if not hasattr(lib, "crypt_gensalt"):
        return None
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    setting = lib.crypt_gensalt(prefix.encode(), 0, None, 0)
    if not setting:
        return None
    h = lib.crypt(password.encode(), setting)
    return h.decode() if h and h.startswith(prefix.encode()) else None


HTPASSWD_FORMATS = [
    # name, password, htpasswd flags, prefix htpasswd writes
    ("bcrypt", "Pw-bcrypt-1", ["-B", "-C", "4"], "$2y$"),
    ("apr1", "Pw-apr1-2", ["-m"], "$apr1$"),
    ("sha1", "Pw-sha1-3", ["-s"], "{SHA}"),
    ("sha256", "Pw-sha256-4", ["-2"], "$5$"),
    ("sha512", "Pw-sha512-5", ["-5", "-r", "1000"], "$6$"),
    ("plain", "Pw-plain-6", ["-p"], None),
]


def test_htpasswd_files_log_in_and_upgrade(authd, tmp_path):
    need(HTPASSWD, "htpasswd is not installed (Debian package apache2-utils)")
    formats = [f for f in HTPASSWD_FORMATS if htpasswd_supports(f[2][0])]
    assert {f[0] for f in formats} >= {"bcrypt", "apr1", "sha1", "plain"}
    src = make_htpasswd(tmp_path / "htpasswd", [(n, p, fl) for n, p, fl, _ in formats])
    lines = src.read_text().splitlines()
    for (name, _, _, prefix), line in zip(formats, lines):
        assert line.startswith(name + ":" + (prefix or "Pw-plain")), line
    extra = []
    for name, prefix in (("bcrypt2a", "$2a$"), ("bcrypt2b", "$2b$"), ("yescrypt", "$y$")):
        h = libcrypt_hash("Pw-" + name, prefix)
        if h:
            extra.append((name, "Pw-" + name, h))
    users = ["# migrated from nginx auth_basic"] + lines + ["%s:%s" % (n, h) for n, _, h in extra]
    a = authd(users=users, env={"AUTH_LOGIN_RATE": "1000/60"})
    os.chmod(a.users_file, 0o640)
    # the plaintext line is hashed at load, everything else stays as htpasswd wrote it
    text = a.users_file.read_text()
    assert users_line(a.users_file, "plain").split(":")[1].startswith("$scrypt$"), text
    assert "Pw-plain-6" not in text
    accounts = [(n, p) for n, p, _, _ in formats] + [(n, p) for n, p, _ in extra]
    for name, password in accounts:
        before = users_line(a.users_file, name)
        r = a.request("POST", "/__auth/login", body={"username": name, "password": "not-" + password})
        assert r.status == 401 and r.json() == {"status": "fail", "message": "Invalid credentials"}, (name, r)
        assert users_line(a.users_file, name) == before  # no upgrade on a failed login
        r = a.request("POST", "/__auth/login", body={"username": name, "password": password})
        assert r.status == 200 and r.json() == {"status": "ok", "user": name}, (name, r, a.log())
        token = r.cookie()
        wait_until(lambda: users_line(a.users_file, name).split(":")[1].startswith("$scrypt$"),
                   what=name + "'s line upgraded to scrypt")
        # the session made by that login survives the upgrade of the hash it was made with
        r = a.auth(token)
        assert r.status == 200 and r.headers["x-auth-user"] == name, (name, r)
        # and the new hash holds the same password (and only that one)
        assert a.login(name, password)
        if name == accounts[0][0]:
            a.login(name, "not-" + password, expect=401)
    final = a.users_file.read_text().splitlines()
    assert final[0] == "# migrated from nginx auth_basic"
    assert [l.split(":")[0] for l in final[1:]] == [n for n, _ in accounts]
    assert all(l.split(":")[1].startswith("$scrypt$") for l in final[1:]), final
    assert stat.S_IMODE(os.stat(a.users_file).st_mode) == 0o640
    leftovers = [p.name for p in tmp_path.iterdir() if re.search(r"tmp|~$|\.new$", p.name, re.I)]
    assert not leftovers, leftovers
    assert "Traceback" not in a.log()


def test_import_htpasswd_merges(authd, tmp_path):
    need(HTPASSWD, "htpasswd is not installed (Debian package apache2-utils)")
    src = make_htpasswd(tmp_path / "htpasswd", [
        ("bob", "Pw-bob", ["-B", "-C", "4"]),
        ("carol", "Pw-carol", ["-m"]),
        ("alice", "Pw-alice-from-htpasswd", ["-s"]),
    ])
    htlines = {l.split(":")[0]: l for l in src.read_text().splitlines()}
    alice = "alice:" + fast_hash("Pw-alice") + ":admin,staff"
    a = authd(users=["# our users", alice])
    r = run_cli("import-htpasswd", src, "--users", a.users_file, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    report = r.stdout + r.stderr
    assert "Traceback" not in report
    for name in ("bob", "carol", "alice"):
        assert name in report, report  # says what it did with every line
    text = a.users_file.read_text()
    assert text.startswith("# our users\n"), text
    # new users arrive as they are (upgraded at their first login)
    assert users_line(a.users_file, "bob") == htlines["bob"]
    assert users_line(a.users_file, "carol") == htlines["carol"]
    # an existing user is not silently replaced by the imported one
    (alice_line,) = [l for l in text.splitlines() if l.startswith("alice:")]
    assert alice_line == alice, text
    # the running server picks the import up by itself
    wait_until(lambda: a.request("POST", "/__auth/login", body={"username": "bob", "password": "Pw-bob"}).status == 200,
               what=lambda: "the import to be picked up:\n" + a.log())
    assert a.login("carol", "Pw-carol")
    assert a.login("alice", "Pw-alice")
    a.login("alice", "Pw-alice-from-htpasswd", expect=401)


def test_import_htpasswd_skips_des_crypt_naming_the_line(authd, tmp_path):
    need(HTPASSWD, "htpasswd is not installed (Debian package apache2-utils)")
    src = make_htpasswd(tmp_path / "htpasswd", [
        ("dave", "Pw-dave", ["-B", "-C", "4"]),
        ("olddes", "desonly", ["-d"]),
        ("erin", "Pw-erin", ["-m"]),
    ])
    des_line = src.read_text().splitlines()[1]
    assert re.match(r"olddes:[./0-9A-Za-z]{13}$", des_line), des_line
    a = authd(users=["alice:" + fast_hash("pw1")])
    r = run_cli("import-htpasswd", src, "--users", a.users_file, cwd=tmp_path)
    report = r.stdout + r.stderr
    assert "Traceback" not in report
    # the message names the line (its number or the user) and why it was skipped
    msgs = [l for l in report.splitlines() if "olddes" in l or re.search(r":2\b|line 2\b", l)]
    assert any(re.search(r"DES|crypt", m, re.I) for m in msgs), report
    assert users_line(a.users_file, "olddes") is None, a.users_file.read_text()
    assert users_line(a.users_file, "dave") is not None and users_line(a.users_file, "erin") is not None
    wait_until(lambda: a.request("POST", "/__auth/login", body={"username": "dave", "password": "Pw-dave"}).status == 200,
               what=lambda: "the import to be picked up:\n" + a.log())
    a.login("olddes", "desonly", expect=401)


def test_express_drop_in_env_and_json_api(authd, tmp_path):
    """The Express auth-server's .env and users.txt, unchanged: same keys, same meaning,
    same JSON login API. (Started without conftest's environment overrides, so that
    the .env file alone decides.)"""
    import jwt

    secret = "express-secret-" + "x" * 40
    (tmp_path / ".env").write_text(
        "# auth-server settings\n"
        "export AUTH_TOKEN_SECRET='%s'\n"
        'AUTH_COOKIE_NAME="expressToken"\n'
        "AUTH_EXPIRY_DAYS=2\n"
        "AUTH_COOKIE_SECURE=false\n"
        "AUTH_BYPASS=express-bypass-9876-at-least-32-characters\n"
        "AUTH_PREFIX=/__auth\n" % secret)
    # the Express users.txt: plaintext passwords, ":admin" for admins
    d = authd(users=["boss:boss-password:admin", "worker:worker-password"], secret=None)
    req = d.request
    text = d.users_file.read_text()
    assert "boss-password" not in text and "worker-password" not in text, text
    assert users_line(d.users_file, "boss").endswith(":admin"), text

    r = req("POST", "/__auth/login", body={"username": "boss", "password": "boss-password"})
    assert r.status == 200, r
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"status": "ok", "user": "boss"}
    assert r.cookie("authToken") is None
    token = r.cookie("expressToken")
    (cookie,) = [v for v in r.header_values("set-cookie") if v.startswith("expressToken=")]
    attrs = [p.strip().lower() for p in cookie.split(";")]
    assert "secure" not in attrs and "httponly" in attrs, cookie
    claims = jwt.decode(token, secret, algorithms=["HS256"])
    assert claims["sub"] == "boss"
    assert claims["exp"] - claims["iat"] == 2 * 86400, claims
    m = re.search(r"max-age=(\d+)", cookie, re.I)
    if m:
        assert int(m.group(1)) == 2 * 86400, cookie
    else:
        from email.utils import parsedate_to_datetime
        expires = parsedate_to_datetime(re.search(r"expires=([^;]+)", cookie, re.I).group(1))
        assert abs(expires.timestamp() - claims["exp"]) <= 60, cookie

    r = req("POST", "/__auth/login", body={"username": "boss", "password": "nope"})
    assert r.status == 401 and r.headers["content-type"].startswith("application/json"), r
    assert r.json() == {"status": "fail", "message": "Invalid credentials"}
    r = req("POST", "/__auth/login", body={"username": "ghost", "password": "nope"})
    assert r.status == 401 and r.json() == {"status": "fail", "message": "Invalid credentials"}

    h = {"Cookie": "expressToken=" + token}
    r = req("GET", "/__auth/auth", headers=h)
    assert r.status == 200 and r.headers["x-auth-user"] == "boss", r
    assert req("GET", "/__auth/admin", headers=h).status == 200
    wtoken = req("POST", "/__auth/login",
                 body={"username": "worker", "password": "worker-password"}).cookie("expressToken")
    assert req("GET", "/__auth/admin", headers={"Cookie": "expressToken=" + wtoken}).status == 403
    r = req("GET", "/__auth/auth", headers={"X-Auth-Bypass": "express-bypass-9876-at-least-32-characters"})
    assert r.status == 200 and "x-auth-user" not in r.headers, r
    assert req("GET", "/__auth/auth", headers={"Cookie": "authToken=" + token}).status == 401
    assert d.stop() == 0, d.log()
