"""What the test files share: authd.py as a subprocess, HTTP to it (plain sockets
where the bytes matter), hand-made tokens, a bounded wait, and the real front ends
(nginx on free loopback ports, an upstream app that echoes, Chromium)."""
import base64
import fcntl
import hashlib
import hmac
import http.client
import importlib.util
import json
import os
import re
import resource
import shutil
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


def make_app(users_path, environ=None):
    """authd's App in this process, with the test secret and USERS_PATH
    (loaded if it exists), for tests that call it or its server directly."""
    import authd as A
    env_file = Path(users_path).parent / "empty.env"
    env_file.write_text("")
    settings, _ = A.load_settings(environ=dict({"AUTH_TOKEN_SECRET": SECRET, "AUTH_USERS_FILE": str(users_path)},
                                              **(environ or {})), env_file=str(env_file))
    store = A.UsersStore(str(users_path))
    if Path(users_path).exists():
        store.load()
    return A.App(settings, [SECRET.encode()], store)


def write_users(path, lines, mode=0o600):
    path = Path(path)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.chmod(path, mode)
    return path


def users_line(path, name):
    """NAME's line in the users file at PATH, or None."""
    for line in Path(path).read_text().splitlines():
        if line.split(":", 1)[0] == name:
            return line
    return None


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


# ---------------------------------------------------------------------------
# real front ends: nginx, an upstream app that echoes, Chromium
# ---------------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 # every name under example.com is this machine, for this browser only (the
                 # screenshots show a real-looking host name; single sign-on needs several)
                 "--host-resolver-rules=MAP example.com 127.0.0.1, MAP *.example.com 127.0.0.1"]
ARTIFACTS = HERE / "test-artifacts"  # screenshots (gitignored)


def nginx_path():
    """$AUTHD_TEST_NGINX if set, else nginx on PATH or in /usr/sbin (not on a
    normal user's PATH on Debian); None when missing."""
    explicit = os.environ.get("AUTHD_TEST_NGINX")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def need_module(name, what):
    need(importlib.util.find_spec(name) is not None, "%s is missing (pip install -r requirements-test.txt)" % what)


def need_openssl():
    need(shutil.which("openssl"), "openssl is missing (Debian: apt-get install openssl)")


def need_browser():
    need(os.access(CHROMIUM, os.X_OK), "%s is missing (Debian: apt-get install chromium)" % CHROMIUM)
    need_module("playwright", "the playwright Python package")


@pytest.fixture(scope="module")
def nginx_tools():
    """nginx, and openssl for the certificate of an HTTPS site."""
    need(nginx_path(), "nginx is not installed (Debian: apt-get install nginx-light)")
    need_openssl()


@pytest.fixture(scope="module")
def pyotp():
    need_module("pyotp", "pyotp")
    import pyotp
    return pyotp


@pytest.fixture(scope="module")
def zxing():
    need_module("zxingcpp", "zxing-cpp")
    import zxingcpp
    return zxingcpp


def substitute(text, old, new, count=1):
    """TEXT with OLD replaced by NEW, which must be there exactly COUNT times (so a
    shipped example cannot drift from what is tested)."""
    found = text.count(old)
    assert found == count, "the example changed: expected %d x %r, found %d" % (count, old, found)
    return text.replace(old, new)


def local_nginx(text, *, http_port, https_port, authd_port, app_port, cert, key, tls_servers=1):
    """An nginx example with its listen ports, authd and app upstreams and certificate
    made local (TLS_SERVERS: how many server blocks listen on 443)."""
    text = substitute(text, "listen 80;", "listen 127.0.0.1:%d;" % http_port)
    text = substitute(text, "listen 443 ssl;", "listen 127.0.0.1:%d ssl;" % https_port, count=tls_servers)
    text = substitute(text, "server 127.0.0.1:3003;", "server 127.0.0.1:%d;" % authd_port)
    text = substitute(text, "server 127.0.0.1:8080;", "server 127.0.0.1:%d;" % app_port)
    text = substitute(text, "/etc/letsencrypt/live/example.com/fullchain.pem", str(cert), count=tls_servers)
    return substitute(text, "/etc/letsencrypt/live/example.com/privkey.pem", str(key), count=tls_servers)


def stop_process(proc, sig=signal.SIGTERM):
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stop_all(proc, *services):
    """Stop a front end's process PROC, then each of SERVICES (an EchoApp, an Authd)
    that was started (None: it was not)."""
    stop_process(proc)
    for service in services:
        if service is not None:
            service.stop()


def make_cert(directory):
    """A throw-away self-signed certificate for 127.0.0.1, localhost, example.com
    and every name under it: (cert path, key path)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=example.com", "-addext",
                    "subjectAltName=DNS:example.com,DNS:*.example.com,DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    need_openssl()
    return make_cert(tmp_path_factory.mktemp("cert"))


class EchoApp:
    """A tiny HTTP/1.1 upstream on a free loopback port. Every request is
    recorded and answered with an HTML page whose <pre id=echo> holds JSON:
    method, path, headers (name -> list of values, so a duplicate shows), body."""

    def __init__(self, name="App"):
        import html
        import http.server
        self.requests = []
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {}
                for key, value in self.headers.items():
                    headers.setdefault(key.lower(), []).append(value)
                record = {"method": self.command, "path": self.path, "headers": headers,
                          "body": body.decode("latin-1")}
                app.requests.append(record)
                page = ("<!doctype html><html><head><title>%s page</title></head><body>"
                        "<h1>%s page %s</h1><pre id=\"echo\">%s</pre></body></html>"
                        % (name, name, html.escape(self.path), html.escape(json.dumps(record)))).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(page)

            do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = handle_any

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def echo_of(body):
    """The JSON record out of an EchoApp page."""
    import html
    m = re.search(rb'<pre id="echo">(.*?)</pre>', body, re.S)
    assert m, body[:500]
    return json.loads(html.unescape(m.group(1).decode()))


def nginx_main_config(workdir, site_file):
    """The minimal nginx.conf around a site: everything nginx writes stays in WORKDIR."""
    user = ""
    if os.geteuid() == 0:  # as root, workers would run as nobody and could not read the tmp dir
        user = "user root;\n"
    temp = "".join("    %s_temp_path %s;\n" % (kind, workdir / ("tmp_" + kind))
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        "%sworker_processes 1;\n"
        "pid %s;\n"
        "error_log %s info;\n"
        "events { worker_connections 256; }\n"
        "http {\n"
        "    types { text/html html; text/css css; image/png png; }\n"
        "    default_type application/octet-stream;\n"
        "    access_log %s;\n"
        "%s"
        "    include %s;\n"
        "}\n" % (user, workdir / "nginx.pid", workdir / "error.log", workdir / "access.log", temp, site_file))


def write_nginx_config(directory, site):
    """DIRECTORY/site.conf holding SITE and DIRECTORY/nginx.conf around it: the latter's path."""
    (directory / "site.conf").write_text(site)
    (directory / "nginx.conf").write_text(nginx_main_config(directory, directory / "site.conf"))
    return directory / "nginx.conf"


def nginx_config_test(directory, site):
    """`nginx -t` on SITE inside the minimal nginx.conf: the CompletedProcess (text)."""
    conf = write_nginx_config(directory, site)
    return subprocess.run([nginx_path(), "-t", "-p", str(directory), "-c", str(conf),
                           "-e", str(directory / "error.log")], capture_output=True, text=True, timeout=30)


def start_nginx(workdir, site_for, ports=2, logs=lambda: ""):
    """nginx running the site SITE_FOR(directory, *PORTS free loopback ports) gives,
    in a fresh folder under WORKDIR, once it has bound its ports (pid file written)
    and answers on the last of them: (process, directory, ports). A free port may be
    taken by someone else before nginx binds it: three tries. LOGS adds to errors."""
    for attempt in range(3):
        directory = workdir / ("nginx%d" % attempt)
        directory.mkdir(parents=True)
        chosen = [free_port() for _ in range(ports)]
        conf = write_nginx_config(directory, site_for(directory, *chosen))
        error_log = directory / "error.log"
        with open(directory / "stderr.log", "wb") as stderr:
            proc = subprocess.Popen([nginx_path(), "-p", str(directory), "-c", str(conf),
                                     "-e", str(error_log), "-g", "daemon off;"],
                                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)

        def said():
            text = error_log.read_text(errors="replace") if error_log.exists() else ""
            return "nginx error.log:\n%s\n%s" % (text[-4000:], logs())
        if wait_serving(proc, lambda: (directory / "nginx.pid").exists(), chosen[-1], "Address already in use",
                        "nginx", lambda: "%s\n%s" % ((directory / "stderr.log").read_text(), said())):
            return proc, directory, chosen
    raise RuntimeError("nginx could not bind free ports:\n" + said())


def wait_serving(proc, ready, port, busy, what, said, timeout=15):
    """True once the server PROC is READY() and answers on loopback PORT; False if it
    exited saying BUSY (its port was taken); else a RuntimeError about WHAT with SAID()."""
    def up():
        if proc.poll() is not None:
            return "exited"
        if ready():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return "up"
            except OSError:
                pass
        return None
    try:
        state = wait_until(up, timeout, what + " to start", interval=0.05)
    except AssertionError:
        stop_process(proc)
        raise RuntimeError("%s did not start:\n%s" % (what, said()))
    if state == "exited" and busy not in said():
        raise RuntimeError("%s exited:\n%s" % (what, said()))
    return state == "up"


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright (the browser is never downloaded)."""
    need_browser()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def new_context(browser):
    """Factory for fresh browser contexts (own cookie jar), closed after the test."""
    contexts = []

    def make(**kwargs):
        kwargs.setdefault("ignore_https_errors", True)  # the throw-away self-signed certificate
        ctx = browser.new_context(**kwargs)
        ctx.set_default_timeout(15000)
        contexts.append(ctx)
        return ctx

    yield make
    for ctx in contexts:
        ctx.close()


def login_in_browser(page, name, password):
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()


def auth_cookie(context):
    return next((c for c in context.cookies() if c["name"] == "authToken"), None)


def decode(token):
    import jwt
    return jwt.decode(token, SECRET, algorithms=["HS256"])


def aged(token, seconds=300):
    """The same session, as if issued SECONDS ago (so authd refreshes it)."""
    import jwt
    claims = decode(token)
    for claim in ("iat", "exp", "auth_time"):
        claims[claim] -= seconds
    old = jwt.encode(claims, SECRET, algorithm="HS256")
    return old if isinstance(old, str) else old.decode()


def signed_in_page(new_context, url, name, password):
    """A fresh browser that asked for URL, signed in as NAME on the login page it got
    instead, and is back at URL: (context, page)."""
    ctx = new_context()
    page = ctx.new_page()
    page.goto(url)
    login_in_browser(page, name, password)
    page.wait_for_url(url)
    return ctx, page
