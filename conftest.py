"""What the test files share: authd.py as a subprocess, HTTP to it (plain sockets
where the bytes matter), hand-made tokens, and a bounded wait."""
import base64
import fcntl
import hashlib
import hmac
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
AUTHD = HERE / "authd.py"
SECRET = "test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(condition, reason):
    """Skip on a developer machine, fail in CI: a missing tool must not hide tests there."""
    if condition:
        return
    if IN_CI:
        pytest.fail("CI must have this: " + reason)
    pytest.skip(reason)


def wait_until(condition, timeout=10, what="condition", interval=0.02):
    """Poll CONDITION every INTERVAL seconds until it returns something truthy, and
    return that; an AssertionError naming WHAT (a string, or a function giving one)
    at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + (what() if callable(what) else what))
        time.sleep(interval)


def clean_environ(extra=None):
    """This process's environment without the settings and systemd variables a
    developer's shell may hold, plus EXTRA."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("AUTH_", "LISTEN_", "NOTIFY_", "JOURNAL_"))}
    environ.update(extra or {})
    return environ


def proc_status(pid, field):
    """A number from /proc/PID/status: VmRSS or VmHWM (KiB), Threads, ..."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError("no %s in /proc/%d/status" % (field, pid))


@pytest.fixture
def open_files():
    """open_files(N): let this process open N files (as far as the hard limit
    allows); returns the limit now in force. The old limit is back after the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def raise_to(wanted):
        if soft < wanted:
            new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]

    yield raise_to
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def tcp_sockets():
    """The kernel's TCP sockets from /proc/net/tcp{,6}: (local port, remote port,
    state as hex: 0A listens, 01 established, 06 time-wait; bytes received but not
    yet read; inode)."""
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            rows.append((int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16), f[3],
                         int(f[4].split(":")[1], 16), f[9]))
    return rows


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# users and tokens
# ---------------------------------------------------------------------------

def fast_hash(password, rounds=4):
    """A cheap but real scrypt hash made by libpass; authd reads parameters from the hash."""
    from passlib.hash import scrypt
    return scrypt.using(rounds=rounds).hash(password)


def write_users(path, lines, mode=0o600):
    path = Path(path)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.chmod(path, mode)
    return path


def b64u(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64u_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def compact(obj):
    """JSON as a JWT carries it: no spaces, UTF-8 bytes."""
    return json.dumps(obj, separators=(",", ":")).encode()


HS256_HEADER = {"alg": "HS256", "typ": "JWT"}


def forge_jwt(header, payload, key=SECRET, digest=hashlib.sha256, sig=None):
    """A JWT built by hand: HEADER and PAYLOAD are objects or raw JSON bytes;
    signed with KEY (str or bytes) unless SIG (bytes) is given."""
    h = header if isinstance(header, bytes) else compact(header)
    p = payload if isinstance(payload, bytes) else compact(payload)
    signing = b64u(h) + "." + b64u(p)
    if sig is None:
        sig = hmac.new(key.encode() if isinstance(key, str) else key, signing.encode(), digest).digest()
    return signing + "." + b64u(sig)


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.all = headers  # list of (name, value) as sent
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    def header_values(self, name):
        return [v for k, v in self.all if k.lower() == name.lower()]

    def json(self):
        return json.loads(self.body)

    def cookie(self, name="authToken"):
        """Value of the named cookie in Set-Cookie, or None."""
        for value in self.header_values("set-cookie"):
            m = re.match(r"\s*%s=([^;]*)" % re.escape(name), value)
            if m:
                return m.group(1)
        return None

    def __repr__(self):
        return "<Response %s %r %r>" % (self.status, self.all, self.body[:200])


def cookie_attrs(set_cookie):
    """'n=v; Path=/; HttpOnly' -> ('n', 'v', {'path': '/', 'httponly': True})"""
    parts = [p.strip() for p in set_cookie.split(";")]
    name, _, value = parts[0].partition("=")
    attrs = {}
    for part in parts[1:]:
        k, eq, v = part.partition("=")
        attrs[k.strip().lower()] = v.strip() if eq else True
    return name, value, attrs


def send(conn, method, path, headers=None, body=None, close=True):
    """One request on CONN (a dict or list body goes as JSON); the Response."""
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        if close:
            conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path, timeout=10):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = str(path)

    def connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self.unix_path)
        self.sock = s


FIELD_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class Raw:
    """Raw HTTP over a socket: nothing between the test and authd's parser."""

    def __init__(self, port, timeout=10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""
        self.eof = False

    def send(self, data):
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before it has read everything

    def _fill(self):
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def response(self, head_only=False):
        """The next response, or None when the server closed the connection
        before sending one. Every header line must be a well-formed field.
        HEAD_ONLY: the answer to a HEAD request, which has no body."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                assert not self.buf, "connection closed inside a response: %r" % self.buf[:300]
                return None
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert re.fullmatch(rb"[\t\x20-\x7e\r\n\x80-\xff]*", head), "control byte in response head: %r" % head
        lines = head.split(b"\r\n")
        m = re.fullmatch(rb"HTTP/1\.1 (\d{3}) [^\r\n]*", lines[0])
        assert m, lines[0]
        headers = []
        for line in lines[1:]:
            assert b"\r" not in line and b"\n" not in line, line
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep and FIELD_NAME_RE.fullmatch(name), "malformed response header line %r" % line
            headers.append((name, value.strip()))
        r = Response(int(m.group(1)), headers, b"")
        r.head = head
        n = 0 if head_only else int(r.headers.get("content-length", "0"))
        while len(self.buf) < n:
            assert self._fill(), "truncated body"
        r.body, self.buf = self.buf[:n], self.buf[n:]
        return r

    def closed_by_server(self, timeout=5):
        """True when the server closes the connection with nothing more to say."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.sock.close()


def raw_request(port, data):
    """Send DATA on a new connection; the first response (None if there was none)."""
    c = Raw(port)
    try:
        c.send(data)
        return c.response()
    finally:
        c.close()


# ---------------------------------------------------------------------------
# authd as a subprocess
# ---------------------------------------------------------------------------

# What systemd does between fork and exec: the socket becomes fd 3 and LISTEN_PID is the
# pid of the process that will run authd (this one: exec keeps the pid).
EXEC_WITH_FD3 = """import os, sys
fd = int(sys.argv[1])
os.dup2(fd, 3)
os.close(fd)
os.environ["LISTEN_PID"] = sys.argv[2] or str(os.getpid())
os.execv(sys.argv[3], sys.argv[3:])
"""
LISTENING = r"listening on (?:http://(\S+):(\d+)|unix:(\S+))"


class Authd:
    """authd.py running as a subprocess, started as a service manager would start it.

    The command line is `authd.py serve --users WORKDIR/users.txt --env WORKDIR/.env`
    and ARGS (default: a free port); COMMAND replaces all of it (and then nothing is
    written to WORKDIR). stdout and stderr are one pipe; JOURNAL names it in
    JOURNAL_STREAM as systemd does for StandardError=journal. LISTEN hands a
    listening socket over as fd 3 with LISTEN_FDS=1 and LISTEN_PID=authd's pid (or
    LISTEN_PID, to test a mismatch). NOTIFY sets NOTIFY_SOCKET; WRAP goes in front
    of the command (strace); UMASK is set in the child. Waits until authd says where
    it listens.
    """

    def __init__(self, workdir, users=None, env=None, args=("--port", "0"), command=None, secret=SECRET,
                 script=AUTHD, listen=None, listen_pid=None, notify=None, journal=False, wrap=(), umask=None):
        self.workdir = Path(workdir)
        self.users_file = self.workdir / "users.txt"
        self.env_file = self.workdir / ".env"
        if users is not None:
            write_users(self.users_file, users)
        if command is None:
            if not self.env_file.exists():
                self.env_file.write_text("")
            command = ["serve", "--users", self.users_file, "--env", self.env_file] + list(args)
        environ = clean_environ({"PYTHONUNBUFFERED": "1"})
        if secret is not None:
            environ["AUTH_TOKEN_SECRET"] = secret
        if notify is not None:
            environ["NOTIFY_SOCKET"] = notify
        environ.update(env or {})
        cmd = [sys.executable, str(script)] + [str(a) for a in command]
        fd = None
        if listen is not None:
            fd = fcntl.fcntl(listen.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
            environ["LISTEN_FDS"] = "1"
            cmd = [sys.executable, "-c", EXEC_WITH_FD3, str(fd), str(listen_pid or "")] + cmd
        r, w = os.pipe()
        if journal:
            st = os.fstat(w)
            environ["JOURNAL_STREAM"] = "%d:%d" % (st.st_dev, st.st_ino)
        self.environ = environ
        self.proc = subprocess.Popen(list(wrap) + cmd, stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                                     env=environ, cwd=str(self.workdir), pass_fds=() if fd is None else (fd,),
                                     preexec_fn=None if umask is None else lambda: os.umask(umask))
        os.close(w)
        if fd is not None:
            os.close(fd)
        self._lines = []
        self._eof = threading.Event()
        threading.Thread(target=self._drain, args=(r,), daemon=True).start()
        self.host = self.port = self.url = self.unix_path = None
        try:
            m = self.wait_log(LISTENING, timeout=30)
        except AssertionError:
            self.stop()
            raise
        if m.group(2):
            self.host, self.port = m.group(1), int(m.group(2))
            self.url = "http://%s:%d" % (self.host, self.port)
        else:
            self.unix_path = m.group(3)

    def _drain(self, fd):
        with os.fdopen(fd, "rb") as out:
            for raw in out:
                self._lines.append(raw.decode("utf-8", "replace"))
        self._eof.set()

    def log(self):
        return "".join(self._lines)

    def lines(self):
        return list(self._lines)

    def wait_log(self, pattern, timeout=15):
        """The first match of PATTERN (multi-line mode) in the log, once it is there."""
        def found():
            m = re.search(pattern, self.log(), re.M)
            if not m and self._eof.is_set():
                raise AssertionError("authd exited (%r) and never logged %r:\n%s"
                                     % (self.proc.poll(), pattern, self.log()))
            return m
        return wait_until(found, timeout, lambda: "%r in the log:\n%s" % (pattern, self.log()))

    def connect(self, timeout=10):
        if self.unix_path:
            return UnixHTTPConnection(self.unix_path, timeout)
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def request(self, method, path, headers=None, body=None, conn=None):
        """One request (a dict or list body goes as JSON), on CONN if given (left open)."""
        return send(conn or self.connect(), method, path, headers, body, close=conn is None)

    def login(self, name, password, expect=200):
        r = self.request("POST", "/__auth/login", body={"username": name, "password": password})
        assert r.status == expect, r
        return r.cookie()

    def auth(self, token, path="/__auth/auth", headers=None):
        h = {"Cookie": "authToken=" + token} if token else {}
        h.update(headers or {})
        return self.request("GET", path, headers=h)

    def healthy(self):
        r = self.request("GET", "/__auth/healthz")
        assert r.status == 200 and r.body.strip() == b"ok", r
        return True

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._eof.wait(5)
        return self.proc.returncode


@pytest.fixture
def authd(tmp_path):
    """Factory: authd(users=[...], env={...}, ...) -> a running Authd in tmp_path
    (or workdir=...); stopped after the test."""
    started = []

    def start(**kwargs):
        d = Authd(kwargs.pop("workdir", tmp_path), **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def run_cli(*args, input=None, env=None, cwd=None, timeout=60):
    """Run `authd.py ARGS` to completion; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, str(AUTHD)] + [str(a) for a in args],
                          input=input, capture_output=True, text=True, env=clean_environ(env),
                          cwd=cwd, timeout=timeout)
