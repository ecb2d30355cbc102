#!/usr/bin/env python3
"""authd benchmark: every figure in one run, side by side, each row repeated (default 3
times, interleaved: repetition 1 of every row, then repetition 2, ...) with its spread.
A repetition of a saturating wrk row is made of 1 s slices spread over the whole run
(`--slice`), because the shared machines drift in speed over tens of seconds.

Needs nginx and wrk (Debian: `apt-get install nginx-light wrk`); uses, when present,
Caddy (`caddy`), htpasswd (`apache2-utils`) and git (for the "before" rows); a row whose
tool or feature is missing prints "n/a (why)". Everything runs on loopback: the script
starts its own nginx instances (one worker each, in a temporary directory), Caddy, authd
and the anchors, and stops exactly the processes it started. The nginx configuration of
every auth_request row is derived from the project's nginx.example.conf by textual
substitution of ports and paths only (keep-alive upstream included), so the rows differ
only in what answers the auth subrequest.

Rows (wrk -t1 at each connection count, default 16 and 64):
  through nginx: a static file (no auth); auth_request -> a second nginx answering
    `return 200;` (the ceiling of any auth server behind auth_request); -> authd with a
    cookie; -> authd "before" (authd.py of an earlier commit, `--before REV`); -> a minimal
    stdlib ThreadingHTTPServer verifying an HS256 cookie (bench/anchor_hs256.py); -> authd
    with the micro-cache; -> authd with a cached Basic pair; -> authd with a Bearer app
    token; nginx auth_basic with a {SHA} and with an $apr1$ htpasswd file
  through nginx over unix sockets: auth_request -> a second nginx answering `return 200;` on a
    unix socket (the unix ceiling); -> a second authd listening on AUTH_SOCKET, with a cookie
  directly: authd, authd before, the stdlib anchor, Basic, Bearer (P/auth)
  Caddy: a static file; forward_auth -> authd P/forward
  paced (open loop, latency from the scheduled send time): 500 req/s through nginx and
    directly; 500 req/s P/auth while 4 clients post logins back to back (authd, before)
  logins per second with the default-cost scrypt hash
  memory: authd's RSS with 10,000 idle keep-alive connections held open, and after all runs

Try `python3 bench/bench.py --help`; `--tiny` runs every row briefly (used by test_bench.py);
`--profile FILE` also samples authd with py-spy under load on P/auth and lists its top costs.
"""
import argparse
import base64
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from clients import (PACED_THREADS, IdleConnections, raise_nofile, request_bytes,  # noqa: E402
                     run_closed, run_paced, timed_request)

ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
INSTALL_HINT = "apt-get install nginx-light wrk"
FILE_BODY = b"<!doctype html><title>bench</title><p>" + b"Hello from nginx. " * 20 + b"</p>\n"
STATIC_PAGE = "/static/index.html"  # nginx.example.conf serves /static/ from `root`
CHEAP_USER = "bench"        # cheap scrypt hash: the per-run logins that fetch cookies
SLOW_USER = "benchslow"     # authd's default-cost hash: logins, Basic pairs
BASIC_USER = "benchbasic"   # nginx auth_basic's htpasswd user
DEFAULT_BEFORE = "a2595e4"  # the release before the asyncio rewrite (issue 11)

# wrk reports through this script: one parseable line from the `done` callback, with its
# latency at the percentiles of QUANTILES (its minimum first, its maximum last), so that the
# latencies of several runs can be pooled (pooled_percentile).
QUANTILES = (0, 10, 25, 50, 60, 70, 75, 80, 85, 90, 95, 97.5, 99, 99.5, 99.9, 99.99, 100)
WRK_LUA_DONE = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  local q = {latency.min}
  for _, p in ipairs({%s}) do q[#q + 1] = latency:percentile(p) end
  q[#q + 1] = latency.max
  io.write(string.format(
    "WRKRESULT requests=%%d duration_us=%%d quantiles_us=%%s " ..
    "err_connect=%%d err_read=%%d err_write=%%d err_status=%%d err_timeout=%%d\n",
    summary.requests, summary.duration, table.concat(q, ","),
    e.connect, e.read, e.write, e.status, e.timeout))
end
''' % ", ".join(str(p) for p in QUANTILES[1:-1])


class BenchError(Exception):
    pass


class NotAvailable(Exception):
    """A row that cannot run here: printed as n/a with the reason."""


T0 = time.monotonic()


def log(*args):
    print("bench: %5.1f s:" % (time.monotonic() - T0), *args, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- tools

def find_tool(name):
    path = shutil.which(name)
    if path:
        return path
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    return None


def check_tools(given=None):
    """Return {'nginx': path, 'wrk': path} or raise with exactly what is missing."""
    given = given or {}
    found = {}
    for name in ("nginx", "wrk"):
        path = given.get(name)
        found[name] = (path if path and os.access(path, os.X_OK) else None) if path else find_tool(name)
    missing = [name for name, path in found.items() if not path]
    if missing:
        raise BenchError("missing: %s (on Debian/Ubuntu: %s)" % (", ".join(missing), INSTALL_HINT))
    try:
        out = subprocess.run([found["nginx"], "-V"], capture_output=True, text=True, timeout=10).stderr
    except (OSError, subprocess.SubprocessError) as e:
        raise BenchError("cannot run %s: %s" % (found["nginx"], e))
    if "auth_request" not in out:
        raise BenchError("this nginx lacks the auth_request module (%s)" % INSTALL_HINT)
    return found


def optional_tool(given, name):
    if given:
        return given if os.access(given, os.X_OK) else None
    return find_tool(name)


def tool_version(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "?"


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connect(addr, timeout):
    """A connected socket to a loopback port (int) or a unix socket (path, str)."""
    if isinstance(addr, int):
        return socket.create_connection(("127.0.0.1", addr), timeout=timeout)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect(addr)
    except OSError:
        s.close()
        raise
    return s


def nginx_address(addr):
    """nginx's spelling of a loopback port (int) or a unix socket path (str)."""
    return "127.0.0.1:%d" % addr if isinstance(addr, int) else "unix:%s" % addr


def wait_port(port, proc, what, timeout=10.0):
    """Wait until something listens on `port`: a loopback port or a unix socket path."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("%s exited with status %s" % (what, proc.returncode))
        try:
            connect(port, 0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise BenchError("%s did not listen on %s within %.0f s" % (what, nginx_address(port), timeout))


# ---------------------------------------------------------------------------- /proc

def proc_cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            data = f.read()
    except OSError:
        return 0.0
    fields = data[data.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def proc_mem_kib(pid):
    """(VmRSS, VmHWM) in KiB."""
    rss = hwm = 0
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def wait_quiet(server, timeout=15.0, window=0.3, busy=0.03):
    """Wait until `server` uses (almost) no CPU: queued logins finish before the next row."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        c0 = server.cpu()
        time.sleep(window)
        if server.cpu() - c0 < busy:
            return True
    return False


# ---------------------------------------------------------------------------- processes

class Process:
    """A child process that we started; stopped by its own PID only."""

    def __init__(self, name, cmd, env=None, cwd=None, stop_signal=signal.SIGTERM):
        self.name = name
        self.stop_signal = stop_signal
        self.lines = []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=env, cwd=cwd)
        self.pid = self.proc.pid
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self):
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))

    def output(self):
        return "".join(self.lines)

    def pids(self):
        """This process and its direct children (nginx's workers)."""
        return [self.pid] + proc_children(self.pid)

    def cpu(self):
        return sum(proc_cpu_seconds(p) for p in self.pids())

    def stop(self, timeout=10):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._reader.join(2)
        return self.proc.returncode


STARTED = []


def stop_all():
    while STARTED:
        p = STARTED.pop()
        try:
            p.stop()
        except Exception as e:  # keep stopping the others
            log("could not stop %s (pid %d): %s" % (p.name, p.pid, e))


def start(name, cmd, **kwargs):
    p = Process(name, cmd, **kwargs)
    STARTED.append(p)
    return p


def stop(p):
    if p in STARTED:
        STARTED.remove(p)
    p.stop()


def wait_listening(proc, what, timeout=30.0):
    """The port from a "listening on http://HOST:PORT" line (authd, the stdlib anchor), or
    the path from authd's "listening on unix:PATH" (AUTH_SOCKET)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"listening on (?:http://([^\s:]+|\[[^\]]+\]):(\d+)|unix:(\S+))", proc.output())
        if m:
            return int(m.group(2)) if m.group(2) else m.group(3)
        if proc.proc.poll() is not None:
            break
        time.sleep(0.02)
    out = proc.output()
    stop(proc)
    raise BenchError("%s did not start:\n%s" % (what, out))


class Server:
    """Something under test with a port (or a unix socket path): CPU and memory of its own process."""

    def __init__(self, proc, port):
        self.proc, self.pid, self.port = proc, proc.pid, port

    def cpu(self):
        return proc_cpu_seconds(self.pid)

    def mem(self):
        return proc_mem_kib(self.pid)


# ---------------------------------------------------------------------------- authd

def scrypt_hash(password, ln=4, r=8, p=1):
    """A cheap scrypt hash in the passlib/libpass `$scrypt$` format authd reads."""
    salt = secrets.token_bytes(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=1 << ln, r=r, p=p, dklen=32)
    b64 = lambda b: base64.b64encode(b).decode().rstrip("=")
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (ln, r, p, b64(salt), b64(dk))


def authd_environ(base_env, extra):
    env = {k: v for k, v in base_env.items()
           if not k.startswith(("AUTH_", "LISTEN_", "NOTIFY_", "JOURNAL_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Authd(Server):
    def __init__(self, cmd, workdir, env_extra, label="authd"):
        self.workdir, self.label = workdir, label
        full = list(cmd) + ["serve", "--host", "127.0.0.1", "--port", "0",
                            "--users", str(workdir / "users.txt"), "--env", str(workdir / "bench.env")]
        self.env = authd_environ(os.environ, env_extra)
        proc = start(label, full, env=self.env, cwd=str(workdir))
        super().__init__(proc, wait_listening(proc, "%s (%s)" % (label, " ".join(full))))

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            return r.status, r.getheaders(), r.read()
        finally:
            conn.close()

    def login(self, prefix, user, password):
        body = json.dumps({"username": user, "password": password}).encode()
        status, headers, data = self.request("POST", prefix + "/login", body,
                                             {"Content-Type": "application/json"})
        if status != 200:
            raise BenchError("%s: login as %r failed: %s %r" % (self.label, user, status, data[:200]))
        for k, v in headers:
            if k.lower() == "set-cookie":
                m = re.match(r"\s*([^=;\s]+)=([^;]*)", v)
                if m and m.group(2):
                    return m.group(1), m.group(2)
        raise BenchError("%s: login as %r set no cookie: %r" % (self.label, user, headers))


def start_authd(cmd, workdir, env, label, max_connections):
    """authd with a connection cap above the idle-connection figure; an authd whose
    settings refuse that cap (before the asyncio core: at most 10000) gets 10000."""
    try:
        a = Authd(cmd, workdir, dict(env, AUTH_MAX_CONNECTIONS=str(max_connections)), label)
    except BenchError as e:
        if "AUTH_MAX_CONNECTIONS" not in str(e) or max_connections <= 10000:
            raise
        log("%s refuses AUTH_MAX_CONNECTIONS=%d; using 10000" % (label, max_connections))
        max_connections = 10000
        a = Authd(cmd, workdir, dict(env, AUTH_MAX_CONNECTIONS="10000"), label)
    a.max_connections = max_connections
    return a


def make_users(args, workdir, cheap_pw, slow_pw):
    workdir.mkdir(exist_ok=True)
    users = workdir / "users.txt"
    users.write_text("# authd benchmark users\n%s:%s\n" % (CHEAP_USER, scrypt_hash(cheap_pw)))
    os.chmod(users, 0o600)
    (workdir / "bench.env").write_text("# authd benchmark: settings come from the environment\n")
    # the realistic, default-cost hash, made by authd itself
    r = authd_command(args, workdir, ["adduser", SLOW_USER], slow_pw + "\n")
    if r.returncode != 0 or (SLOW_USER + ":$scrypt$") not in users.read_text():
        raise BenchError("`authd.py adduser` failed (status %s): %s%s" % (r.returncode, r.stdout, r.stderr))
    return users


def authd_command(args, workdir, argv, stdin=""):
    env = authd_environ(os.environ, {"AUTH_USERS_FILE": str(workdir / "users.txt"),
                                     "AUTH_TOKEN_SECRET": args.secret})
    cmd = list(args.authd_cmd) + argv + ["--users", str(workdir / "users.txt"), "--env", str(workdir / "bench.env")]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env, cwd=str(workdir), timeout=120)


def make_app_token(args, workdir):
    """`authd.py token add NAME --label bench` (issue 13): the token it prints once."""
    r = authd_command(args, workdir, ["token", "add", CHEAP_USER, "--label", "bench"])
    if r.returncode != 0:
        if "invalid choice" in r.stderr or "token" not in authd_command(args, workdir, ["--help"]).stdout:
            raise NotAvailable("no token command")
        raise NotAvailable("`token add` failed: %s" % (r.stderr.strip().splitlines() or ["?"])[-1][:80])
    words = re.findall(r"[A-Za-z0-9_\-.~+/=]{40,}", r.stdout)
    if not words:
        raise NotAvailable("`token add` printed no token")
    return words[-1]


def fetch_before(args, work):
    """authd.py as of commit args.before, written to its own folder; (cmd, folder)."""
    folder = work / "before"
    folder.mkdir()
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "show", "%s:authd.py" % args.before],
                           capture_output=True, timeout=60)
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before],
                             capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        raise NotAvailable("git: %s" % e)
    if r.returncode != 0 or not r.stdout:
        raise NotAvailable("git show %s:authd.py failed" % args.before)
    (folder / "authd.py").write_bytes(r.stdout)
    args.before_rev = rev or args.before
    return [args.python, str(folder / "authd.py")], folder


# ---------------------------------------------------------------------------- nginx

def nginx_main_conf(workdir, servers):
    tmp = workdir / "nginx-tmp"
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    return """# generated by bench/bench.py
worker_processes 1;
error_log %(w)s/nginx-error.log warn;
pid %(w)s/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    default_type application/octet-stream;
    types { text/html html; text/css css; }
    client_body_temp_path %(t)s/body;
    proxy_temp_path %(t)s/proxy;
    fastcgi_temp_path %(t)s/fastcgi;
    uwsgi_temp_path %(t)s/uwsgi;
    scgi_temp_path %(t)s/scgi;
%(servers)s
}
""" % {"w": workdir, "t": tmp, "servers": servers}


def plain_server(port, docroot, basic_file=None):
    auth = ('auth_basic "bench"; auth_basic_user_file %s; ' % basic_file) if basic_file else ""
    return """
    server {
        listen 127.0.0.1:%d;
        server_name localhost;
        root %s;
        location / { %stry_files $uri =404; }
    }
""" % (port, docroot, auth)


def ceiling_server(port):
    """The cheapest possible auth server: nginx answering 200 with no body, on a loopback
    port or a unix socket path."""
    return """
    server {
        listen %s;
        location / { return 200; }
    }
""" % nginx_address(port)


def derive_server(example_text, port, authd_port, docroot, cache_dir, cache):
    """nginx.example.conf, changed by textual substitution of ports and paths only (and,
    for the micro-cache scenario, its `#~ ` lines enabled as the file says to):
    - `upstream authd` -> the auth server's port or unix socket path; any other upstream ->
      a dead loopback port (the benchmark only fetches static files, served from `root`);
    - the TLS `listen ... ssl` line -> 127.0.0.1:PORT (plain HTTP; ssl_* lines dropped),
      any other `listen` line -> another free loopback port;
    - `root` -> the benchmark's document root; `proxy_cache_path` -> a temporary folder."""
    text = enable_microcache(example_text) if cache else example_text
    out = []
    upstream = None
    bench_listen = 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#"):
            out.append(line)
            continue
        m = re.match(r"upstream\s+(\S+)\s*\{", s)
        if m:
            upstream = m.group(1)
        elif upstream and s.startswith("}"):
            upstream = None
        elif upstream and re.match(r"server\s", s):
            target = authd_port if upstream == "authd" else DEAD_PORT
            line = re.sub(r"server\s+[^;\s]+", "server " + nginx_address(target), line, count=1)
        elif re.match(r"listen\s", s):
            if re.search(r"\bssl\b", s.split("#")[0]):
                line = re.sub(r"listen\s+[^;]+;", "listen 127.0.0.1:%d;" % port, line)
                bench_listen += 1
            else:
                line = re.sub(r"listen\s+[^;]+;", "listen 127.0.0.1:%d;" % free_port(), line)
        elif re.match(r"(ssl_\w+|http2)\s", s):
            continue  # no TLS on the loopback benchmark
        out.append(line)
    text = "\n".join(out) + "\n"
    if bench_listen != 1:
        raise BenchError("nginx.example.conf: expected one `listen ... ssl` line (the protected site), found %d"
                         % bench_listen)
    if "server " + nginx_address(authd_port) + ";" not in text:
        raise BenchError("nginx.example.conf: found no `upstream authd { server ...; }` to point at authd")
    text, n = re.subn(r"(?m)^(\s*)root\s+[^;]+;", r"\g<1>root %s;" % docroot, text)
    if n == 0:
        raise BenchError("nginx.example.conf: found no `root` line for the static files")
    text = re.sub(r"(?m)^(\s*proxy_cache_path\s+)\S+", r"\g<1>%s" % cache_dir, text)
    return text


DEAD_PORT = 9  # discard: nothing listens there on loopback; never contacted by the benchmark


def enable_microcache(text):
    """Remove the "#~ " marker in front of the micro-cache lines, as the example says."""
    text, n = re.subn(r"(?m)^(\s*)#~ ?", r"\1", text)
    if not n:
        raise BenchError("nginx.example.conf: found no micro-cache lines marked `#~ ` to enable")
    return text


class Nginx:
    def __init__(self, nginx_bin, workdir, name, servers, port):
        self.dir = workdir / ("nginx-" + name)
        self.dir.mkdir()
        os.chmod(self.dir, 0o755)
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(nginx_main_conf(self.dir, servers))
        test = subprocess.run([nginx_bin, "-t", "-p", str(self.dir), "-e", str(self.dir / "nginx-error.log"),
                               "-c", str(self.conf)], capture_output=True, text=True, timeout=30)
        if test.returncode != 0:
            raise BenchError("nginx rejects the generated config %s:\n%s" % (self.conf, test.stderr))
        self.proc = start("nginx-" + name, [nginx_bin, "-p", str(self.dir), "-e", str(self.dir / "nginx-error.log"),
                                            "-c", str(self.conf), "-g", "daemon off;"],
                          stop_signal=signal.SIGTERM)
        self.port = port
        try:
            wait_port(port, self.proc.proc, "nginx (%s)" % name)
        except BenchError as e:
            raise BenchError("%s\n%s%s" % (e, self.proc.output(), self.error_log()))
        self.pid = self.proc.pid

    def cpu(self):
        return self.proc.cpu()

    def mem(self):
        return None

    def error_log(self):
        try:
            return (self.dir / "nginx-error.log").read_text()
        except OSError:
            return ""


def make_htpasswd(htpasswd, path, flag, password):
    """An htpasswd file made by apache2-utils' htpasswd (-s: {SHA}, -m: $apr1$)."""
    r = subprocess.run([htpasswd, "-c", "-b", flag, str(path), BASIC_USER, password],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise NotAvailable("htpasswd %s failed: %s" % (flag, r.stderr.strip()[:80]))
    os.chmod(path, 0o644)  # nginx's worker may run as another user
    return path


# ---------------------------------------------------------------------------- caddy

CADDYFILE = """# generated by bench/bench.py
{
	admin off
	auto_https off
}
http://:%(static)d {
	bind 127.0.0.1
	root * %(docroot)s
	file_server
}
http://:%(forward)d {
	bind 127.0.0.1
	forward_auth 127.0.0.1:%(authd)d {
		uri %(prefix)s/forward
		copy_headers X-Auth-User X-Auth-Groups X-Auth-Admin
	}
	root * %(docroot)s
	file_server
}
"""


class Caddy:
    """Caddy with its own Caddyfile on loopback ports, admin API off, its HOME and
    XDG folders in the work directory: never the system service."""

    def __init__(self, caddy_bin, workdir, docroot, authd_port, prefix, procs):
        self.dir = workdir / "caddy"
        self.dir.mkdir()
        self.static_port, self.forward_port = free_port(), free_port()
        conf = self.dir / "Caddyfile"
        conf.write_text(CADDYFILE % {"static": self.static_port, "forward": self.forward_port, "docroot": docroot,
                                     "authd": authd_port, "prefix": prefix})
        env = dict(os.environ, HOME=str(self.dir), XDG_CONFIG_HOME=str(self.dir / "config"),
                   XDG_DATA_HOME=str(self.dir / "data"), GOMAXPROCS=str(procs))
        self.proc = start("caddy", [caddy_bin, "run", "--config", str(conf), "--adapter", "caddyfile"],
                          env=env, cwd=str(self.dir))
        self.pid = self.proc.pid
        try:
            wait_port(self.static_port, self.proc.proc, "caddy", timeout=20)
            wait_port(self.forward_port, self.proc.proc, "caddy", timeout=20)
        except BenchError as e:
            raise BenchError("%s\n%s" % (e, self.proc.output()[-3000:]))

    def cpu(self):
        return self.proc.cpu()

    def mem(self):
        return None


# ---------------------------------------------------------------------------- HTTP

def http_get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def header_dict(headers):
    return dict(h.split(": ", 1) for h in headers)


def check_get(port, path, headers, expect_status, expect_body=None, what=""):
    status, hdrs, body = http_get(port, path, header_dict(headers))
    if status != expect_status or (expect_body is not None and body != expect_body):
        raise BenchError("%s: GET %s on port %d gave %s %r, expected %s"
                         % (what, path, port, status, body[:120], expect_status))
    return hdrs


# ---------------------------------------------------------------------------- load

def wrk_command(args, url, connections, duration, headers=(), lua_extra="", timeout_s=None):
    script = args.workdir / ("wrk-%d.lua" % secrets.randbits(32))
    script.write_text(lua_extra + WRK_LUA_DONE)
    cmd = [args.wrk, "-t1", "-c%d" % connections, "-d%ds" % max(1, round(duration)), "-s", str(script)]
    if timeout_s:
        cmd += ["--timeout", "%ds" % timeout_s]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    return cmd


def parse_wrk(cmd, returncode, output):
    m = re.search(r"^WRKRESULT (.*)$", output, re.M)
    if returncode != 0 or not m:
        raise BenchError("wrk failed (status %s): %s\n%s" % (returncode, " ".join(cmd), output))
    res = dict(kv.split("=") for kv in m.group(1).split())
    quantiles = [(p, float(us) / 1000) for p, us in zip(QUANTILES, res.pop("quantiles_us").split(","))]
    res = {k: float(v) for k, v in res.items()}
    dur = res["duration_us"] / 1e6
    errors = {k[4:]: int(v) for k, v in res.items() if k.startswith("err_") and v}
    return {"requests": int(res["requests"]), "duration": dur, "rps": res["requests"] / dur if dur else 0.0,
            "quantiles_ms": quantiles, "p50_ms": dict(quantiles)[50], "p99_ms": dict(quantiles)[99],
            "max_ms": quantiles[-1][1], "errors": sum(errors.values()), "error_detail": errors}


def run_wrk(args, url, connections, duration, headers=(), lua_extra="", timeout_s=None):
    cmd = wrk_command(args, url, connections, duration, headers, lua_extra, timeout_s)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish: %s" % " ".join(cmd))
    return parse_wrk(cmd, r.returncode, r.stdout + r.stderr)


def share_at_most(quantiles, x):
    """The share of a run's requests with a latency of at most x, taken as linear between
    the percentiles wrk reported (exact at each of them)."""
    if x < quantiles[0][1]:
        return 0.0
    for (p0, x0), (p1, x1) in zip(quantiles, quantiles[1:]):
        if x < x1:
            return (p0 + (p1 - p0) * (x - x0) / (x1 - x0)) / 100
    return 1.0


def pooled_percentile(parts, p):
    """The p-th percentile of the latencies of several wrk runs pooled together: the least
    latency that at least p % of all their requests stayed within (bisection)."""
    total = sum(r["requests"] for r in parts)
    if not total:
        return None
    lo = min(r["quantiles_ms"][0][1] for r in parts)
    hi = max(r["quantiles_ms"][-1][1] for r in parts)
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(r["requests"] * share_at_most(r["quantiles_ms"], mid) for r in parts) >= total * p / 100:
            hi = mid
        else:
            lo = mid
    return hi


def weighted(parts, key, weight):
    values = [(r[key], r[weight]) for r in parts]
    if any(v is None for v, _ in values):
        return None
    return sum(v * w for v, w in values) / max(sum(w for _, w in values), 1e-9)


def merge_slices(parts):
    """One repetition from the slices it was measured in: as if they were one long run."""
    if len(parts) == 1:
        return parts[0]
    requests, duration = sum(r["requests"] for r in parts), sum(r["duration"] for r in parts)
    details = {}
    for r in parts:
        for k, v in r["error_detail"].items():
            details[k] = details.get(k, 0) + v
    hwm = [r["auth_hwm_kib"] for r in parts if r.get("auth_hwm_kib") is not None]
    return {"requests": requests, "duration": duration, "rps": requests / duration if duration else 0.0,
            "slice_starts_s": [r["start_s"] for r in parts],
            "p50_ms": pooled_percentile(parts, 50), "p99_ms": pooled_percentile(parts, 99),
            "max_ms": max(r["max_ms"] for r in parts), "errors": sum(r["errors"] for r in parts),
            "error_detail": details, "auth_cpu_us": weighted(parts, "auth_cpu_us", "requests"),
            "proxy_cpu_us": weighted(parts, "proxy_cpu_us", "requests"),
            "other_cpu_pct": weighted(parts, "other_cpu_pct", "duration"),
            "auth_rss_kib": parts[-1].get("auth_rss_kib"), "auth_hwm_kib": max(hwm) if hwm else None}


def login_lua(password):
    body = json.dumps({"username": SLOW_USER, "password": password})
    return ('wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n'
            % lua_string(body))


def lua_string(s):
    return '"' + "".join(c if c.isalnum() or c in " {}:,._-" else "\\%03d" % ord(c) for c in s) + '"'


def system_busy_seconds():
    """CPU time used on the whole machine so far (all CPUs, /proc/stat), in seconds."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / CLK_TCK  # minus idle and iowait


def own_cpu_seconds():
    """CPU time of this script, its finished children (wrk) and the processes it runs."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime + sum(p.cpu() for p in STARTED)


class Measure:
    """CPU of the auth server and of the proxy around one load run, the auth server's
    memory, and the CPU that other programs on the machine used meanwhile (a noise meter)."""

    def __init__(self, auth=None, proxy=None):
        self.auth, self.proxy = auth, proxy

    def __enter__(self):
        self.a0 = self.auth.cpu() if self.auth else 0.0
        self.n0 = self.proxy.cpu() if self.proxy else 0.0
        self.s0, self.o0, self.t0 = system_busy_seconds(), own_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc):
        self.a1 = self.auth.cpu() if self.auth else 0.0
        self.n1 = self.proxy.cpu() if self.proxy else 0.0
        self.s1, self.o1, self.t1 = system_busy_seconds(), own_cpu_seconds(), time.monotonic()
        self.mem = self.auth.mem() if self.auth else None

    def annotate(self, res, noise=True):
        """Per-request CPU, RSS and, for saturating runs, the noise meter: /proc/stat is
        sampled by the tick, so at low load (the paced runs) it means nothing."""
        n = max(res["requests"], 1)
        res["start_s"] = round(self.t0 - T0, 3)
        res["auth_cpu_us"] = (self.a1 - self.a0) / n * 1e6 if self.auth else None
        res["proxy_cpu_us"] = (self.n1 - self.n0) / n * 1e6 if self.proxy else None
        res["auth_rss_kib"], res["auth_hwm_kib"] = self.mem if self.mem else (None, None)
        other = (self.s1 - self.s0) - (self.o1 - self.o0)
        res["other_cpu_pct"] = max(0.0, 100.0 * other / (max(self.t1 - self.t0, 1e-3) * (os.cpu_count() or 1))) \
            if noise else None
        return res


def verify_microcache(port, authd, cookie):
    """True when nginx answers a repeated allowed request from its cache: authd is paused
    (SIGSTOP to its PID) for the second request and resumed at once after it."""
    check_get(port, STATIC_PAGE, [cookie], 200, FILE_BODY, "micro-cache warm-up")
    os.kill(authd.pid, signal.SIGSTOP)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            conn.request("GET", STATIC_PAGE, headers=header_dict([cookie]))
            r = conn.getresponse()
            return r.status == 200 and r.read() == FILE_BODY
        except OSError:
            return False
        finally:
            conn.close()
    finally:
        os.kill(authd.pid, signal.SIGCONT)


# ---------------------------------------------------------------------------- rows

SECTIONS = [
    ("nginx", "through nginx (auth_request, keep-alive upstream per nginx.example.conf); "
              "%% of the nginx static row and of the ceiling row (the unix ceiling for the unix-socket rows)"),
    ("direct", "the auth server directly (wrk to P/auth with what nginx's subrequest sends)"),
    ("caddy", "Caddy (GOMAXPROCS=%(caddy_procs)d); %% of the Caddy static row"),
    ("paced", "paced, open loop (%(rate)d req/s on %(threads)d keep-alive connections, latency from "
              "the scheduled send time; wrk2-style)"),
    ("logins", "logins with the default-cost scrypt hash (ln=17, 128 MiB)"),
]
GROUPS = ("nginx", "ceiling", "unix", "direct", "before", "anchor", "cache", "basic", "token", "auth_basic",
          "caddy", "paced", "flood", "logins", "idle")


class Row:
    """One line of the table per connection count, measured `reps` times."""

    def __init__(self, rid, section, label, groups, conns):
        self.rid, self.section, self.label, self.groups, self.conns = rid, section, label, groups, conns
        self.na = None          # why this row cannot run here
        self.run = None         # run(conns) -> one result
        self.warm = None        # once before the first repetition
        self.runs = {}          # conns -> [result, ...], one per repetition
        self.slices = 1         # runs a repetition is measured in (wrk rows: --duration / --slice)
        self.parts = {}         # (conns, repetition) -> [result of one slice, ...]
        self.max_reps = None    # fewer repetitions than the others (--tiny: the login rows)
        self.extra = {}

    def result(self, res, conns, rep):
        self.parts.setdefault((conns, rep), []).append(res)
        log("%-66s c=%-3s %9.0f req/s  p50 %.3f ms  p99 %.3f ms  errors %d %s"
            % (self.label, conns, res["rps"], res["p50_ms"], res["p99_ms"], res["errors"],
               res["error_detail"] or ""))

    def merge(self):
        for (conns, rep), parts in sorted(self.parts.items()):
            self.runs.setdefault(conns, []).append(merge_slices(parts))


def wrk_row(args, row, auth, proxy, target):
    """A saturating wrk row: target() -> (url, headers) for one run (a fresh cookie per run:
    the measured path is the common one, no token refresh due)."""
    def run(c):
        url, headers = target()
        with Measure(auth, proxy) as m:
            res = run_wrk(args, url, c, args.duration // args.slices, headers)
        return m.annotate(res)

    def warm():
        if args.warmup > 0:
            url, headers = target()
            run_wrk(args, url, 16, args.warmup, headers)

    row.run, row.warm, row.slices = run, warm, args.slices
    return row


class Bench:
    """The servers of one run and the rows that measure them."""

    def __init__(self, args, work):
        self.args, self.work = args, work
        self.rows = []
        self.memory = {}
        self.prefix = args.prefix
        self.docroot = work / "html"
        self.cheap_pw = secrets.token_urlsafe(16)
        self.slow_pw = secrets.token_urlsafe(16)
        self.basic_pw = secrets.token_urlsafe(16)
        # what nginx's auth_request subrequest sends (see the /__auth/auth location)
        self.direct_headers = ["X-Original-URI: " + STATIC_PAGE, "X-Original-Host: localhost",
                               "X-Original-Remote-Addr: 127.0.0.1", "X-Real-IP: 127.0.0.1"]
        self.authd = self.before = self.caddy = None

    def wanted(self, *groups):
        a = self.args
        if set(groups) & a.skip:
            return False
        return not a.only or bool(set(groups) & a.only)

    def row(self, rid, section, label, groups, conns=None):
        r = Row(rid, section, label, groups, conns or self.args.connections)
        if self.wanted(*groups):
            self.rows.append(r)
            return r
        return None

    def cookie(self, a):
        name, value = a.login(self.prefix, CHEAP_USER, self.cheap_pw)
        return "Cookie: %s=%s" % (name, value)

    def protected_nginx(self, name, port_of_auth, cache=False, enforced=True):
        port = free_port()
        ng = Nginx(self.args.nginx_bin, self.work, name,
                   derive_server(self.args.example_text, port, port_of_auth, self.docroot,
                                 self.work / ("cache-" + name), cache), port)
        if enforced:
            st, _, body = http_get(port, STATIC_PAGE)
            if st == 200 and body == FILE_BODY:
                raise BenchError("%s: nginx served the file without a cookie: auth_request is not in force" % name)
        return ng

    def url(self, port, path=STATIC_PAGE):
        return "http://127.0.0.1:%d%s" % (port, path)

    def nginx_to(self, rid, label, groups, auth, name, header_fn, auth_port=None, enforced=True):
        """A row: the static file through nginx whose auth_request goes to `auth`."""
        row = self.row(rid, "nginx", label, groups)
        if row is None:
            return None
        ng = self.protected_nginx(name, auth_port or auth.port, enforced=enforced)
        check_get(ng.port, STATIC_PAGE, header_fn(), 200, FILE_BODY, label)
        return wrk_row(self.args, row, auth, ng, lambda: (self.url(ng.port), header_fn()))

    def direct(self, rid, label, groups, a, header_fn):
        row = self.row(rid, "direct", label, groups)
        if row is None:
            return None
        path = self.prefix + "/auth"
        check_get(a.port, path, header_fn() + self.direct_headers, 200, None, label)
        return wrk_row(self.args, row, a, None, lambda: (self.url(a.port, path), header_fn() + self.direct_headers))

    def na_row(self, rid, section, label, groups, reason):
        row = self.row(rid, section, label, groups)
        if row is not None:
            row.na = reason
            log("%s: n/a (%s)" % (label, reason))
        return row

    # -- the servers and rows, in the order the table shows them -------------------

    def setup(self):
        a = self.args
        self.write_docroot()
        after = self.work / "after"
        make_users(a, after, self.cheap_pw, self.slow_pw)
        self.token, self.token_na = None, None
        if self.wanted("token"):
            try:
                self.token = make_app_token(a, after)  # before authd starts: no reload to wait for
            except NotAvailable as e:
                self.token_na = str(e)
        # every login comes from 127.0.0.1: the rate limits would turn the benchmark's own
        # logins (a cookie per run, the login rows) into 429s; they are not what is measured
        self.base_env = {"AUTH_TOKEN_SECRET": a.secret, "AUTH_CACHE_SECONDS": "0", "AUTH_LOGIN_RATE": "1000000/1"}
        cap = a.idle + 1024
        self.authd = start_authd(a.authd_cmd, after, self.base_env, "authd", cap)
        self.before_na = None
        if self.wanted("before", "idle"):
            try:
                cmd, folder = fetch_before(a, self.work)
                for name in ("users.txt", "bench.env"):
                    shutil.copy2(after / name, folder / name)
                self.before = start_authd(cmd, folder, self.base_env, "authd-before", cap)
            except NotAvailable as e:
                self.before_na = str(e)
        self.anchor = self.start_anchor(after) if self.wanted("anchor") else None
        self.ng_authd = None
        self.nginx_rows()
        self.direct_rows()
        self.caddy_rows()
        self.paced_rows()
        self.login_rows()

    def write_docroot(self):
        static = self.docroot / "static"
        static.mkdir(parents=True)
        for d in (self.docroot, static):
            os.chmod(d, 0o755)
        (static / "index.html").write_bytes(FILE_BODY)
        os.chmod(static / "index.html", 0o644)

    def start_anchor(self, users_dir):
        env = authd_environ(os.environ, {"AUTH_TOKEN_SECRET": self.args.secret})
        proc = start("anchor", [self.args.python, str(HERE / "anchor_hs256.py"), "--port", "0",
                                "--users", str(users_dir / "users.txt")], env=env)
        return Server(proc, wait_listening(proc, "the stdlib anchor"))

    def basic_header(self, user, password):
        return "Authorization: Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()

    def api_credentials(self):
        """[(kind, label, header)] of the issue 13 rows, or their n/a reasons."""
        out = []
        if self.wanted("basic"):
            out.append(("basic", "Basic (default-cost user, cached)", self.basic_header(SLOW_USER, self.slow_pw)))
        if self.wanted("token"):
            out.append(("token", "Bearer app token", "Authorization: Bearer %s" % self.token if self.token else None))
        return out

    def api_na(self, header):
        """Why authd cannot answer this credential on P/auth yet, or None."""
        if header is None:
            return self.token_na
        # the first Basic check costs one scrypt hash; later ones hit the cache
        status, _, _ = http_get(self.authd.port, self.prefix + "/auth", header_dict([header] + self.direct_headers))
        return None if status == 200 else "authd answers %d: not implemented yet" % status

    def authd_nginx(self):
        if self.ng_authd is None:
            self.ng_authd = self.protected_nginx("auth", self.authd.port)
        return self.ng_authd

    def nginx_rows(self):
        a, authd = self.args, self.authd
        cookie = lambda: [self.cookie(authd)]
        if self.wanted("nginx") or self.wanted("auth_basic"):  # --skip auth_basic keeps the static row
            self.plain_nginx()
        if self.wanted("ceiling"):
            port = free_port()
            self.nginx_to("ceiling", "nginx -> nginx `return 200;` (the ceiling)", ("ceiling",),
                          self.ceiling_backend("ceiling-backend", port), "ceiling", cookie, auth_port=port,
                          enforced=False)
        row = self.row("authd", "nginx", "nginx -> authd, cookie", ("nginx",))
        if row:
            ng = self.authd_nginx()
            check_get(ng.port, STATIC_PAGE, cookie(), 200, FILE_BODY, row.label)
            wrk_row(a, row, authd, ng, lambda: (self.url(ng.port), cookie()))
        self.unix_rows(cookie)
        if self.before:
            self.nginx_to("before", "nginx -> authd before (%s), cookie" % a.before_rev, ("before",),
                          self.before, "before", lambda: [self.cookie(self.before)])
        else:
            self.na_row("before", "nginx", "nginx -> authd before (%s), cookie" % a.before, ("before",), self.before_na)
        if self.anchor:
            self.nginx_to("anchor", "nginx -> stdlib ThreadingHTTPServer HS256", ("anchor",), self.anchor,
                          "anchor", cookie)
        self.cache_row()
        for kind, label, header in self.api_credentials():
            reason = self.api_na(header)
            if reason:
                self.na_row(kind, "nginx", "nginx -> authd, " + label, (kind, "nginx"), reason)
            else:
                self.nginx_to(kind, "nginx -> authd, " + label, (kind, "nginx"), authd, "auth-" + kind,
                              lambda h=header: [h])
        for flag, fmt_name in (("-s", "{SHA}"), ("-m", "$apr1$")):
            label = "nginx auth_basic, %s htpasswd" % fmt_name
            rid = "auth_basic-" + fmt_name.strip("{}$").lower()
            if self.wanted("auth_basic"):
                self.auth_basic_row(rid, label, flag)

    def ceiling_backend(self, name, addr):
        """The second nginx answering `return 200;` on `addr` (a loopback port or a unix socket path)."""
        return Nginx(self.args.nginx_bin, self.work, name, ceiling_server(addr), addr)

    def unix_rows(self, cookie):
        """The ceiling and authd again, each behind nginx's auth upstream over a unix socket:
        a second authd process (one authd listens on one socket) with AUTH_SOCKET; the cookie
        comes from the first authd (same secret and users file)."""
        if not self.wanted("unix"):
            return
        sock = str(self.work / "ceiling.sock")
        self.nginx_to("ceiling-unix", "nginx -> nginx `return 200;` over a unix socket (the unix ceiling)",
                      ("unix",), self.ceiling_backend("ceiling-unix-backend", sock), "ceiling-unix", cookie,
                      auth_port=sock, enforced=False)
        # nginx's worker runs as another user (nobody) when the benchmark runs as root
        env = dict(self.base_env, AUTH_SOCKET=str(self.work / "authd.sock"), AUTH_SOCKET_MODE="0666")
        authd_unix = Authd(self.args.authd_cmd, self.work / "after", env, "authd-unix")
        self.nginx_to("authd-unix", "nginx -> authd, cookie, over a unix socket", ("unix",), authd_unix,
                      "auth-unix", cookie)

    def plain_nginx(self):
        a = self.args
        self.plain = {"static": free_port()}
        servers = plain_server(self.plain["static"], self.docroot)
        self.htpasswd_na = None
        htpasswd = optional_tool(a.htpasswd, "htpasswd")
        if not htpasswd:
            self.htpasswd_na = "htpasswd not installed (apt-get install apache2-utils)"
        elif self.wanted("auth_basic"):
            for flag in ("-s", "-m"):
                try:
                    f = make_htpasswd(htpasswd, self.work / ("htpasswd" + flag), flag, self.basic_pw)
                except NotAvailable as e:
                    self.plain[flag] = str(e)
                    continue
                self.plain[flag] = free_port()
                servers += plain_server(self.plain[flag], self.docroot, f)
        ng = self.plain_ng = Nginx(a.nginx_bin, self.work, "plain", servers, self.plain["static"])
        row = self.row("static", "nginx", "nginx static file, no auth", ("nginx",))
        if row:
            check_get(ng.port, STATIC_PAGE, [], 200, FILE_BODY, row.label)
            wrk_row(a, row, None, ng, lambda: (self.url(ng.port), []))

    def auth_basic_row(self, rid, label, flag):
        port = self.plain.get(flag)
        if self.htpasswd_na or not isinstance(port, int):
            return self.na_row(rid, "nginx", label, ("auth_basic",), self.htpasswd_na or port)
        row = self.row(rid, "nginx", label, ("auth_basic",))
        header = [self.basic_header(BASIC_USER, self.basic_pw)]
        check_get(port, STATIC_PAGE, [], 401, None, label + ", without a password")
        check_get(port, STATIC_PAGE, header, 200, FILE_BODY, label)
        return wrk_row(self.args, row, None, self.plain_ng, lambda: (self.url(port), header))

    def cache_row(self):
        row = self.row("cache", "nginx", "nginx -> authd + micro-cache (%d s)" % self.args.cache_seconds, ("cache",))
        if row is None:
            return
        env = dict(self.base_env, AUTH_CACHE_SECONDS=str(self.args.cache_seconds))
        authd_c = Authd(self.args.authd_cmd, self.work / "after", env, "authd-cache")
        ng = self.protected_nginx("cache", authd_c.port, cache=True)
        row.extra["cache_verified"] = verify_microcache(ng.port, authd_c, self.cookie(authd_c))
        if not row.extra["cache_verified"]:
            log("WARNING: nginx did not answer from the micro-cache while authd was paused")
        wrk_row(self.args, row, authd_c, ng, lambda: (self.url(ng.port), [self.cookie(authd_c)]))

    def direct_rows(self):
        authd = self.authd
        p = self.prefix
        if self.wanted("direct"):
            self.direct("authd-direct", "authd %s/auth, cookie" % p, ("direct",), authd, lambda: [self.cookie(authd)])
        label = "authd before (%s) %s/auth, cookie" % (self.args.before, p)
        if self.before:
            self.direct("before-direct", label.replace(self.args.before, self.args.before_rev), ("before", "direct"),
                        self.before, lambda: [self.cookie(self.before)])
        else:
            self.na_row("before-direct", "direct", label, ("before", "direct"), self.before_na)
        if self.anchor:
            self.direct("anchor-direct", "stdlib ThreadingHTTPServer HS256", ("anchor", "direct"), self.anchor,
                        lambda: [self.cookie(authd)])
        for kind, label, header in self.api_credentials():
            rid, label = kind + "-direct", "authd %s/auth, %s" % (p, label)
            reason = self.api_na(header)
            if reason:
                self.na_row(rid, "direct", label, (kind, "direct"), reason)
            else:
                self.direct(rid, label, (kind, "direct"), authd, lambda h=header: [h])

    def caddy_rows(self):
        a = self.args
        if not self.wanted("caddy"):
            return
        caddy_bin = optional_tool(a.caddy, "caddy")
        if not caddy_bin:
            for rid, label in (("caddy-static", "Caddy static file, no auth"),
                               ("caddy-forward", "Caddy forward_auth -> authd %s/forward" % self.prefix)):
                self.na_row(rid, "caddy", label, ("caddy",), "caddy not installed (apt-get install caddy)")
            return
        a.caddy_bin = caddy_bin
        caddy = self.caddy = Caddy(caddy_bin, self.work, self.docroot, self.authd.port, self.prefix, a.caddy_procs)
        row = self.row("caddy-static", "caddy", "Caddy static file, no auth", ("caddy",))
        check_get(caddy.static_port, STATIC_PAGE, [], 200, FILE_BODY, row.label)
        wrk_row(a, row, None, caddy, lambda: (self.url(caddy.static_port), []))
        label = "Caddy forward_auth -> authd %s/forward" % self.prefix
        reason = self.forward_na(caddy)
        if reason:
            return self.na_row("caddy-forward", "caddy", label, ("caddy",), reason)
        row = self.row("caddy-forward", "caddy", label, ("caddy",))
        wrk_row(a, row, self.authd, caddy, lambda: (self.url(caddy.forward_port), [self.cookie(self.authd)]))

    def forward_na(self, caddy):
        """Why Caddy's forward_auth to authd cannot be measured (issue 14), or None."""
        cookie = self.cookie(self.authd)
        fwd = ["X-Forwarded-Method: GET", "X-Forwarded-Proto: http",
               "X-Forwarded-Host: 127.0.0.1:%d" % caddy.forward_port, "X-Forwarded-Uri: " + STATIC_PAGE,
               "X-Forwarded-For: 127.0.0.1"]
        status, _, _ = http_get(self.authd.port, self.prefix + "/forward", header_dict([cookie] + fwd))
        if status == 404:
            return "authd answers 404 on %s/forward: not implemented yet" % self.prefix
        if status != 200:
            return "authd answers %d on %s/forward with a valid cookie" % (status, self.prefix)
        status, _, body = http_get(caddy.forward_port, STATIC_PAGE, header_dict([cookie]))
        if status != 200 or body != FILE_BODY:
            return "Caddy forward_auth answers %d with a valid cookie" % status
        st, _, body = http_get(caddy.forward_port, STATIC_PAGE)
        if st == 200 and body == FILE_BODY:
            raise BenchError("Caddy served the file without a cookie: forward_auth is not in force")
        return None

    def paced_rows(self):
        a, authd, p = self.args, self.authd, self.prefix
        if self.wanted("paced"):
            ng = self.authd_nginx()
            self.paced("paced-nginx", "%d/s, nginx -> authd" % a.rate, ("paced",), ng.port, STATIC_PAGE,
                       lambda: [self.cookie(authd)], authd, ng)
            self.paced("paced-direct", "%d/s, authd %s/auth" % (a.rate, p), ("paced", "direct"), authd.port,
                       p + "/auth", lambda: [self.cookie(authd)] + self.direct_headers, authd, None)
        label = "%d/s, %%s, %d logins running" % (a.rate, a.login_connections)
        if self.wanted("flood"):
            self.flood("flood", label % "authd", ("flood",), authd)
        if self.before:
            self.flood("flood-before", label % ("authd before (%s)" % a.before_rev), ("flood", "before"), self.before)
        else:
            self.na_row("flood-before", "paced", label % ("authd before (%s)" % a.before), ("flood", "before"),
                        self.before_na)

    def paced(self, rid, label, groups, port, path, header_fn, auth, proxy):
        row = self.row(rid, "paced", label, groups, [PACED_THREADS])
        if row is None:
            return

        def run(c):
            headers = header_fn()
            with Measure(auth, proxy) as m:
                res = run_paced(port, path, headers, self.args.rate, self.args.duration, threads=c)
            return m.annotate(res, noise=False)
        row.run = run

    def flood(self, rid, label, groups, a):
        """A paced P/auth run while clients post logins back to back (default-cost hash)."""
        row = self.row(rid, "paced", label, groups, [PACED_THREADS])
        if row is None:
            return
        args = self.args
        row.max_reps = 1 if args.tiny else None

        def run(c):
            headers = [self.cookie(a)] + self.direct_headers
            # stopped with SIGINT (wrk then reports) once the paced run is over
            cmd = wrk_command(args, self.url(a.port, self.prefix + "/login"), args.login_connections,
                              args.duration + 30, lua_extra=login_lua(self.slow_pw), timeout_s=30)
            cpu0 = a.cpu()
            flood = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + 5
                while a.cpu() - cpu0 < 0.2 and time.monotonic() < deadline:
                    time.sleep(0.02)  # the logins are hashing
                with Measure(a, None) as m:
                    res = run_paced(a.port, self.prefix + "/auth", headers, args.rate, args.duration, threads=c)
                flood.send_signal(signal.SIGINT)
                out, _ = flood.communicate(timeout=60)
            finally:
                if flood.poll() is None:
                    flood.kill()
                    flood.wait()
            logins = parse_wrk(cmd, flood.returncode, out)
            res = m.annotate(res, noise=False)
            res["auth_cpu_us"] = None  # it includes the hashes: not a per-check cost
            res.update(logins=logins["requests"], login_errors=logins["error_detail"])
            wait_quiet(a)
            return res
        row.run = run

    def login_rows(self):
        a, authd = self.args, self.authd
        row = self.row("logins", "logins", "logins/s, authd, clients back to back", ("logins",),
                       [a.login_connections])
        if row is None:
            return
        row.max_reps = 1 if a.tiny else None

        body = json.dumps({"username": SLOW_USER, "password": self.slow_pw}).encode()
        raw = request_bytes(authd.port, self.prefix + "/login",
                            ["Content-Type: application/json", "Content-Length: %d" % len(body)], "POST") + body

        def run(c):
            # closed loop (bench/clients.py): a login in flight at the end is awaited and counted
            with Measure(authd, None) as m:
                res = run_closed(authd.port, raw, c, max(a.duration, 3))
            res = m.annotate(res)
            wait_quiet(authd)  # let the logins still queued finish before the next row
            return res
        row.run = run

    # -- measuring ---------------------------------------------------------------

    def measure(self):
        """Every row `--reps` times. The machines are shared and their speed drifts over
        tens of seconds, so a repetition of a wrk row is `--slices` short runs spread over
        the whole benchmark: pass n measures one slice of every wrk row for repetition
        n % reps. The other rows run once every `--slices` passes."""
        a = self.args
        for n in range(a.reps * a.slices):
            log("pass %d of %d" % (n + 1, a.reps * a.slices))
            for row in self.rows:
                rep = n % a.reps if row.slices > 1 else n // a.slices
                if row.na or row.run is None or (row.slices == 1 and n % a.slices) or \
                        (row.max_reps is not None and rep >= row.max_reps):
                    continue
                if n == 0 and row.warm:
                    row.warm()
                for c in row.conns:
                    row.result(row.run(c), c, rep)
        for row in self.rows:
            row.merge()

    def idle_figures(self):
        for name, a in (("authd", self.authd), ("authd before", self.before)):
            if a is not None and self.wanted("idle"):
                log("%s: opening %d idle keep-alive connections" % (name, self.args.idle))
                self.memory.setdefault(name, {})["idle"] = self.idle_figure(a)

    def idle_figure(self, a):
        """authd's RSS while this process holds `--idle` keep-alive connections open,
        each used for one P/auth; and how fast a new P/auth is answered meanwhile."""
        args = self.args
        raw = request_bytes(a.port, self.prefix + "/auth", [self.cookie(a)] + self.direct_headers)
        held = IdleConnections(a.port, raw)
        fig = {"wanted": args.idle, "max_connections": a.max_connections, "rss_before_kib": a.mem()[0]}
        t0 = time.monotonic()
        try:
            fig["answered"] = held.open(args.idle, timeout=args.idle_timeout)
            fig.update(open_s=time.monotonic() - t0, refused=held.refused, unanswered=held.unanswered,
                       rss_held_kib=a.mem()[0])
            probe_s, status = timed_request(a.port, raw, 5.0)
            fig["probe_ms"] = None if probe_s is None else probe_s * 1000
            fig["probe_status"] = status
            time.sleep(args.idle_hold)
            fig["still_open"] = held.still_open()
            fig["hold_s"] = args.idle_hold
            fig["rss_end_kib"] = a.mem()[0]
        finally:
            held.close()
        return fig

    def final_memory(self):
        for name, a in (("authd", self.authd), ("authd before", self.before)):
            if a is not None:
                wait_quiet(a, timeout=5)
                rss, hwm = a.mem()
                self.memory.setdefault(name, {}).update(after_all_kib=rss, peak_kib=hwm)


def main_run(args):
    tools = check_tools({"nginx": args.nginx, "wrk": args.wrk})
    args.wrk = tools["wrk"]
    args.nginx_bin = tools["nginx"]
    example, authd_py = Path(args.nginx_conf), Path(args.authd)
    deadline = time.monotonic() + args.wait
    while not (example.exists() and authd_py.exists()):
        if time.monotonic() >= deadline:
            raise BenchError("missing: %s" % ", ".join(str(p) for p in (authd_py, example) if not p.exists()))
        time.sleep(2)
    args.example_text = example.read_text()
    args.authd_cmd = [args.python, str(authd_py)]
    args.secret = secrets.token_urlsafe(48)
    args.before_rev = args.before
    args.nofile = raise_nofile(args.idle + 4096)  # children (authd) inherit it
    work = Path(tempfile.mkdtemp(prefix="authd-bench-"))
    os.chmod(work, 0o755)  # nginx workers may run as another user
    args.workdir = work
    bench = Bench(args, work)
    try:
        log("work directory %s" % work)
        bench.setup()
        bench.measure()
        if args.profile:
            profile_authd(args, bench.authd, bench.url(bench.authd.port, args.prefix + "/auth"),
                          [bench.cookie(bench.authd)] + bench.direct_headers)
        bench.idle_figures()
        bench.final_memory()
    finally:
        stop_all()
        if args.keep:
            log("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return bench


def profile_authd(args, authd, url, headers):
    """py-spy samples authd (attached by PID) while wrk hits P/auth directly; writes the
    raw stacks to FILE and prints the top functions by own and by inclusive time."""
    spy = find_tool("py-spy")
    if not spy:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    conns = args.connections[0]
    raw = Path(args.profile)
    cmd = [spy, "record", "-p", str(authd.pid), "-r", str(args.profile_rate), "--nonblocking"] + \
        ([] if args.profile_lines else ["-F"]) + ["-f", "raw", "-o", str(raw), "-d", str(args.duration + 1)]
    if not args.profile_all_threads:
        cmd.append("--gil")
    log("profiling authd (pid %d) under wrk -c%d for %d s: %s" % (authd.pid, conns, args.duration, " ".join(cmd)))
    spy_proc = start("py-spy", cmd)
    time.sleep(0.5)
    res = run_wrk(args, url, conns, args.duration, headers)
    spy_proc.proc.wait(args.duration + 30)
    stop(spy_proc)
    if not raw.exists():
        raise BenchError("py-spy wrote no profile:\n%s" % spy_proc.output())
    log("under py-spy: %.0f req/s" % res["rps"])
    own, incl, total = {}, {}, 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    out = sys.stdout
    out.write("\nprofile of authd under wrk -t1 -c%d on P/auth (%s, %d samples%s): %s\n"
              % (conns, "py-spy", total, "" if args.profile_all_threads else ", GIL holder only", raw))
    for title, table in (("own time", own), ("inclusive time", incl)):
        out.write("top %s:\n" % title)
        for frame, n in sorted(table.items(), key=lambda kv: -kv[1])[:args.profile_top]:
            out.write("  %5.1f %%  %s\n" % (100.0 * n / max(total, 1), frame))
    out.write("\n")


# ---------------------------------------------------------------------------- results

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def spread_pct(values):
    """The largest distance of a repetition from the median, in % of the median."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    m = statistics.median(values)
    return 100.0 * max(abs(v - m) for v in values) / m if m else None


def aggregate(bench):
    """One record per row and connection count: medians over the repetitions."""
    out = []
    for row in bench.rows:
        for c in row.conns:
            rec = {"id": row.rid, "label": row.label, "section": row.section, "conns": c, "na": row.na}
            rec.update(row.extra)
            runs = row.runs.get(c, [])
            if not row.na and not runs:
                rec["na"] = "not run"
            if rec["na"]:
                out.append(rec)
                continue
            col = lambda k: [r.get(k) for r in runs]
            rec.update({k: median(col(k)) for k in ("rps", "p50_ms", "p99_ms", "auth_cpu_us", "proxy_cpu_us")})
            details = {}
            for r in runs:
                for k, v in r["error_detail"].items():
                    details[k] = details.get(k, 0) + v
            others = [v for v in col("other_cpu_pct") if v is not None]
            rec.update(reps=runs, repetitions=len(runs), requests=sum(col("requests")),
                       rps_spread_pct=spread_pct(col("rps")), p99_spread_pct=spread_pct(col("p99_ms")),
                       max_ms=max(col("max_ms")), errors=sum(col("errors")), error_detail=details,
                       other_cpu_pct=max(others) if others else None,
                       auth_rss_kib=runs[-1].get("auth_rss_kib"),
                       auth_hwm_kib=max([v for v in col("auth_hwm_kib") if v is not None] or [None]))
            if "logins" in runs[0]:
                rec["logins"] = sum(col("logins"))
            out.append(rec)
    by = {(r["id"], r["conns"]): r for r in out}
    for r in out:
        base = {"nginx": "static", "caddy": "caddy-static"}.get(r["section"])
        r["pct_static"] = pct(r, by.get((base, r["conns"])))
        behind_auth_request = r["section"] == "nginx" and r["id"] != "static" and not r["id"].startswith("auth_basic")
        ceiling = "ceiling-unix" if r["id"].endswith("-unix") else "ceiling"
        r["pct_ceiling"] = pct(r, by.get((ceiling, r["conns"]))) if behind_auth_request else None
    return out


def pct(rec, base):
    if rec.get("na") or not base or base.get("na") or not base.get("rps"):
        return None
    return 100.0 * rec["rps"] / base["rps"]


# ---------------------------------------------------------------------------- report

def fmt(v, spec, dash="-"):
    return dash if v is None else format(v, spec)


def machine_info():
    model = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": os.getloadavg()}


COLS = "%-66s %5s %8s %4s %6s %5s %7s %8s %4s %8s %7s %7s %7s %6s %5s\n"


def report(args, bench, records, out=sys.stdout):
    w = out.write
    for line in header_lines(args, bench):
        w(line + "\n")
    w("\n")
    w(COLS % ("row", "conns", "req/s", "±%", "% of", "% of", "p50", "p99", "±%", "max", "auth", "proxy",
              "auth", "errors", "other"))
    w(COLS % ("", "", "", "", "static", "ceil", "ms", "ms", "", "ms", "us/req", "us/req", "RSS MiB", "", "CPU%"))
    for section, title in SECTIONS:
        recs = [r for r in records if r["section"] == section]
        if not recs:
            continue
        w("-- %s\n" % (title % {"caddy_procs": args.caddy_procs, "rate": args.rate, "threads": PACED_THREADS}))
        for r in recs:
            w(table_line(r))
    w("\n")
    w("auth = the server answering the check (authd, the anchor, the ceiling's second nginx); proxy = nginx or Caddy;\n"
      "CPU from /proc/PID/stat per request; other CPU% = what other programs used meanwhile (the noise meter).\n")
    ratios = ratio_lines(args, records, w)
    memory_lines(bench, w)
    if any(r.get("cache_verified") is False for r in records):
        w("WARNING: nginx did not answer from its micro-cache while authd was paused: the cache is not in effect\n")
    return ratios


def header_lines(args, bench):
    mi = machine_info()
    caddy = ("Caddy %s (GOMAXPROCS=%d)" % (tool_version([args.caddy_bin, "version"]).split(" ")[0], args.caddy_procs)
             if getattr(args, "caddy_bin", None) else "Caddy not used")
    return [
        "authd benchmark, %s: %s, %d cores; Linux %s; load average at start %.2f (the machine is shared: "
        "compare ratios within this run)" % (time.strftime("%Y-%m-%d %H:%M"), mi["cpu"], mi["nproc"], mi["kernel"],
                                              args.loadavg[0]),
        "authd on %s %s; %s (worker_processes 1, access_log off); %s; %s -t1; paced client: "
        "bench/clients.py" % (Path(args.python).name, args.python_version,
                              tool_version([args.nginx_bin, "-v"]).replace("nginx version: ", ""), caddy,
                              tool_version([args.wrk, "--version"]).split(" [")[0]),
        "%g s per run, %d repetitions per row (interleaved%s), figures are medians, ±%% = largest distance "
        "of a repetition from the median" % (args.duration, args.reps, "; wrk rows in %d slices of %d s spread over "
                                            "the run" % (args.slices, args.slice) if args.slices > 1 else ""),
        "authd = %s; authd before = authd.py of %s (git show)" % (args.authd, args.before_rev),
    ]


def table_line(r):
    if r["na"]:
        return "%-66s %5d  n/a (%s)\n" % (r["label"], r["conns"], r["na"])
    rps = r["rps"]
    rss = None if r.get("auth_rss_kib") is None else r["auth_rss_kib"] / 1024
    return COLS % (
        r["label"], r["conns"], fmt(rps, ".0f" if rps >= 100 else ".1f"), fmt(r["rps_spread_pct"], ".0f"),
        fmt(r["pct_static"], ".1f"), fmt(r["pct_ceiling"], ".0f"), fmt(r["p50_ms"], ".2f"), fmt(r["p99_ms"], ".2f"),
        fmt(r["p99_spread_pct"], ".0f"), fmt(r["max_ms"], ".1f"), fmt(r["auth_cpu_us"], ".0f"),
        fmt(r["proxy_cpu_us"], ".0f"), fmt(rss, ".1f"), r["errors"], fmt(r["other_cpu_pct"], ".0f"))


def ratio_lines(args, records, w):
    """The comparisons the issues ask for, from this run's medians; returns them as a dict."""
    by = {(r["id"], r["conns"]): r for r in records if not r["na"]}
    ratios = {}

    def ratio(num, den, key="rps", conns=None):
        parts = []
        for c in conns or args.connections:
            a, b = by.get((num, c)), by.get((den, c))
            if a and b and a.get(key) and b.get(key):
                ratios["%s/%s %s@%d" % (num, den, key, c)] = a[key] / b[key]
                parts.append((c, a[key] / b[key]))
        return parts

    def show(parts, form="%.2fx"):
        return ", ".join((form + " at c%d") % (v * (100 if "%%" in form else 1), c) for c, v in parts) or "n/a"

    w("\nratios (medians of this run):\n")
    w("  nginx -> authd / ceiling, req/s: %s (issue 11: >= 70 %%)\n" % show(ratio("authd", "ceiling"), "%.0f %%"))
    w("  nginx -> authd / ceiling, p99: %s (issue 11: <= 3x at c64)\n" % show(ratio("authd", "ceiling", "p99_ms")))
    w("  nginx -> authd / ceiling over unix sockets, req/s: %s\n"
      % show(ratio("authd-unix", "ceiling-unix"), "%.0f %%"))
    w("  authd / authd before (%s), req/s: directly %s; through nginx %s (issue 11: directly >= 3x)\n"
      % (args.before_rev, show(ratio("authd-direct", "before-direct")), show(ratio("authd", "before"))))
    w("  authd / stdlib anchor, req/s: directly %s; through nginx %s\n"
      % (show(ratio("authd-direct", "anchor-direct")), show(ratio("authd", "anchor"))))
    for kind, name in (("basic", "cached Basic pair"), ("token", "Bearer token")):
        w("  %s / cookie, authd CPU per check: directly %s; through nginx %s (issue 13: <= 1.2x)\n"
          % (name, show(ratio(kind + "-direct", "authd-direct", "auth_cpu_us")),
             show(ratio(kind, "authd", "auth_cpu_us"))))
    w("  Caddy forward_auth -> authd / Caddy static, req/s: %s\n"
      % show(ratio("caddy-forward", "caddy-static"), "%.0f %%"))
    for rid in ("flood", "flood-before"):
        r = by.get((rid, PACED_THREADS))
        if r:
            w("  %s: p50 %.2f ms, p99 %.2f ms, max %.1f ms; %d logins meanwhile (issue 11: p99 < 5 ms)\n"
              % (r["label"], r["p50_ms"], r["p99_ms"], r["max_ms"], r["logins"]))
    spread_line(by, ratios, w)
    return ratios


def spread_line(by, ratios, w):
    spread = [(r["rps_spread_pct"], r["label"], r["conns"]) for r in by.values() if r.get("rps_spread_pct") is not None]
    if spread:
        worst = max(spread)
        ratios["worst_spread_pct"] = worst[0]
        w("  spread of req/s over repetitions: largest ±%.0f %% (%s, c%d); %d of %d rows over ±15 %% (issue 11: none)\n"
          % (worst[0], worst[1], worst[2], sum(s[0] > 15 for s in spread), len(spread)))


def memory_lines(bench, w):
    if not bench.memory:
        return
    w("\nmemory (VmRSS of the authd process):\n")
    for name, m in bench.memory.items():
        fig = m.get("idle")
        if fig:
            probe = ("answered %s in %.1f ms" % (fig["probe_status"], fig["probe_ms"])) if fig["probe_ms"] is not None \
                else fig["probe_status"]
            w("  %s, %d idle keep-alive connections (AUTH_MAX_CONNECTIONS=%d): %d answered in %.1f s "
              "(%d refused, %d unanswered), %d still open after %g s more; RSS %.1f MiB before, %.1f MiB with them "
              "held, %.1f MiB at the end; a new P/auth meanwhile: %s (issue 11: < 100 MiB)\n"
              % (name, fig["wanted"], fig["max_connections"], fig["answered"], fig["open_s"], fig["refused"],
                 fig["unanswered"], fig["still_open"], fig["hold_s"], fig["rss_before_kib"] / 1024,
                 fig["rss_held_kib"] / 1024, fig["rss_end_kib"] / 1024, probe))
        if "after_all_kib" in m:
            w("  %s, after all runs: RSS %.1f MiB (peak %.1f MiB) (issue 11: < 30 MiB)\n"
              % (name, m["after_all_kib"] / 1024, m["peak_kib"] / 1024))


# ---------------------------------------------------------------------------- command line

def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark authd behind nginx auth_request and Caddy forward_auth, with its anchors, "
                    "on loopback, in one run. Needs nginx and wrk (%s); caddy, htpasswd (apache2-utils) "
                    "and git when present." % INSTALL_HINT,
        epilog="Rows: nginx static file; auth_request to a `return 200;` nginx (ceiling), to authd, the same "
               "two over unix sockets (unix), to authd before (--before), to a stdlib ThreadingHTTPServer HS256 "
               "anchor, to authd with the micro-cache, with a cached Basic pair, with a Bearer token; nginx "
               "auth_basic {SHA} and $apr1$; the same auth servers directly; Caddy static and forward_auth; "
               "paced latency runs, also while logins run; logins/s with the default-cost hash; RSS with many "
               "idle keep-alive connections and after all runs. "
               "Groups for --only/--skip: " + ", ".join(GROUPS))
    p.add_argument("--duration", type=int, default=None, help="seconds per measured run (default 5; 1 with --tiny)")
    p.add_argument("--reps", type=int, default=None, help="repetitions per row, interleaved (default 3; 2 with --tiny)")
    p.add_argument("--slice", type=int, default=1, help="wrk rows: a repetition is --duration / --slice runs of this "
                   "many seconds, spread over the whole benchmark (default 1; 0: one run of --duration)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up before a row (default 1; 0 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="1 s runs, c16 only, 2 repetitions (the login rows 1), "
                   "300 idle connections (used by test_bench.py)")
    p.add_argument("--connections", default=None, help="comma list of wrk connection counts (default 16,64)")
    p.add_argument("--rate", type=int, default=500, help="paced runs: requests per second (default 500)")
    p.add_argument("--login-connections", type=int, default=4, help="clients posting logins back to back (default 4)")
    p.add_argument("--only", default="", help="comma list of row groups to run (default all)")
    p.add_argument("--skip", default="", help="comma list of row groups to leave out")
    p.add_argument("--cache-seconds", type=int, default=10, help="AUTH_CACHE_SECONDS of the micro-cache row (default 10)")
    p.add_argument("--authd", default=str(ROOT / "authd.py"), help="authd.py to run (default: the repository's)")
    p.add_argument("--before", default=DEFAULT_BEFORE, help="git revision of the `authd before` rows (default %s, "
                   "the release before the asyncio rewrite)" % DEFAULT_BEFORE)
    p.add_argument("--nginx-conf", default=str(ROOT / "nginx.example.conf"), help="nginx example config to derive from")
    p.add_argument("--python", default=sys.executable, help="interpreter for authd and the anchor (default: this one)")
    p.add_argument("--prefix", default="/__auth", help="AUTH_PREFIX (default /__auth)")
    p.add_argument("--idle", type=int, default=None, help="idle keep-alive connections to hold open (default 10000)")
    p.add_argument("--idle-hold", type=float, default=None, help="seconds to hold them before counting (default 3)")
    p.add_argument("--idle-timeout", type=float, default=None, help="give up opening them after this long (default 60)")
    p.add_argument("--caddy-procs", type=int, default=1, help="GOMAXPROCS for Caddy (default 1, as nginx's one worker)")
    p.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for authd.py and the example config to appear")
    p.add_argument("--profile", metavar="FILE", help="also profile authd with py-spy under wrk on P/auth "
                   "(first connection count) and write py-spy's raw stacks to FILE")
    p.add_argument("--profile-all-threads", action="store_true",
                   help="with --profile: sample every active thread, not only the one holding the GIL")
    p.add_argument("--profile-rate", type=int, default=1000, help="with --profile: samples per second (default 1000)")
    p.add_argument("--profile-lines", action="store_true", help="with --profile: per line, not per function")
    p.add_argument("--profile-top", type=int, default=20, help="with --profile: how many functions to list")
    p.add_argument("--nginx", help="nginx binary (default: found on PATH or in /usr/sbin)")
    p.add_argument("--wrk", help="wrk binary (default: found on PATH)")
    p.add_argument("--caddy", help="caddy binary (default: found on PATH)")
    p.add_argument("--htpasswd", help="htpasswd binary (default: found on PATH)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = p.parse_args(argv)
    tiny = args.tiny
    defaults = {"duration": (5, 1), "reps": (3, 2), "warmup": (1, 0), "connections": ("16,64", "16"), "idle": (10000, 300),
                "idle_hold": (3.0, 1.0), "idle_timeout": (60.0, 15.0)}
    for name, (full, small) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, small if tiny else full)
    for name in ("only", "skip"):
        groups = {g.strip() for g in getattr(args, name).split(",") if g.strip()}
        if groups - set(GROUPS):
            p.error("--%s: unknown group(s) %s; groups: %s" % (name, ", ".join(sorted(groups - set(GROUPS))),
                                                                ", ".join(GROUPS)))
        setattr(args, name, groups)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        p.error("--connections: a comma list of numbers")
    if not args.connections or min(args.connections) < 1 or args.duration <= 0 or args.rate < 1 or args.reps < 1:
        p.error("connections, duration, rate and reps must be positive")
    if args.slice < 0 or (args.slice and args.duration % args.slice):
        p.error("--slice: 0, or a number of seconds that divides --duration (%d)" % args.duration)
    args.slices = args.duration // args.slice if args.slice else 1
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    args.loadavg = os.getloadavg()
    try:
        args.python_version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                                             capture_output=True, text=True, timeout=30).stdout.strip() or "?"
        bench = main_run(args)
    except BenchError as e:
        print("bench: error: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stop_all()
        print("bench: interrupted", file=sys.stderr)
        return 130
    records = aggregate(bench)
    ratios = report(args, bench, records)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine_info(), "duration": args.duration, "reps": args.reps, "connections": args.connections,
            "rate": args.rate, "before": args.before_rev, "results": records, "ratios": ratios,
            "memory": bench.memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
