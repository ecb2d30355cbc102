#!/usr/bin/env python3
"""authd benchmark: nginx alone, nginx + auth_request -> authd, the micro-cache,
authd directly, a paced latency run and logins per second, measured in one run.

Needs nginx and wrk (Debian: `apt-get install nginx-light wrk`). Everything runs on
loopback: the script starts its own nginx (one worker, in a temporary directory) and
its own authd.py, and stops exactly the processes it started. The nginx configuration
for the auth'd scenarios is derived from the project's nginx.example.conf by textual
substitution of ports and paths only, so the benchmark measures what the example ships.

Rows (wrk -t1 at each connection count, default 16 and 64):
  (a) nginx serving a small file, no auth
  (b) the same file behind auth_request to authd (nginx.example.conf, upstream keepalive)
  (c) the same with the opt-in micro-cache enabled (AUTH_CACHE_SECONDS > 0)
  (d) authd's P/auth hit directly with a valid cookie
  (e) a paced run at a fixed rate (default 500 req/s) for latency, through nginx and direct
  (f) logins per second with the default-cost (ln=17) scrypt hash
Columns: req/s, p50 and p99 latency, CPU per request of authd and nginx (from
/proc/PID/stat utime+stime), authd's RSS and peak RSS (VmRSS/VmHWM), errors.

Try `python3 bench/bench.py --help`; `--tiny` runs every scenario for about a second;
`--profile FILE` also samples authd with py-spy under load on P/auth and lists its top costs.
"""
import argparse
import base64
import hashlib
import http.client
import json
import os
import platform
import resource
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
INSTALL_HINT = "apt-get install nginx-light wrk"
FILE_BODY = b"<!doctype html><title>bench</title><p>" + b"Hello from nginx. " * 20 + b"</p>\n"

STATIC_PAGE = "/static/index.html"  # nginx.example.conf serves /static/ from `root`
CHEAP_USER = "bench"
SLOW_USER = "benchslow"

# wrk reports through this script: one parseable line from the `done` callback.
WRK_LUA_DONE = r'''
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKRESULT requests=%d duration_us=%d p50_us=%.1f p99_us=%.1f mean_us=%.1f max_us=%.1f " ..
    "err_connect=%d err_read=%d err_write=%d err_status=%d err_timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
'''


class BenchError(Exception):
    pass


def log(*args):
    print("bench:", *args, file=sys.stderr, flush=True)


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


def wait_port(port, proc, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("%s exited with status %s" % (what, proc.returncode))
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise BenchError("%s did not listen on 127.0.0.1:%d within %.0f s" % (what, port, timeout))


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
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open("/proc/%s/stat" % entry) as f:
                        data = f.read()
                    if int(data[data.rindex(")") + 2:].split()[1]) == pid:
                        kids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        return kids


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


class Authd:
    def __init__(self, args, workdir, env_extra, label="authd"):
        self.workdir = workdir
        cmd = list(args.authd_cmd) + ["serve", "--host", "127.0.0.1", "--port", "0",
                                      "--users", str(workdir / "users.txt"),
                                      "--env", str(workdir / "bench.env")]
        self.env = authd_environ(os.environ, env_extra)
        self.proc = start(label, cmd, env=self.env, cwd=str(workdir))
        self.pid = self.proc.pid
        self.port = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.port is None:
            m = re.search(r"listening on http://([^\s:]+|\[[^\]]+\]):(\d+)", self.proc.output())
            if m:
                self.port = int(m.group(2))
                break
            if self.proc.proc.poll() is not None:
                break
            time.sleep(0.02)
        if self.port is None:
            out = self.proc.output()
            stop(self.proc)
            raise BenchError("authd did not start (%s):\n%s" % (" ".join(cmd), out))

    def cpu(self):
        return proc_cpu_seconds(self.pid)

    def mem(self):
        return proc_mem_kib(self.pid)

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
            raise BenchError("login as %r failed: %s %r" % (user, status, data[:200]))
        for k, v in headers:
            if k.lower() == "set-cookie":
                m = re.match(r"\s*([^=;\s]+)=([^;]*)", v)
                if m and m.group(2):
                    return m.group(1), m.group(2)
        raise BenchError("login as %r set no cookie: %r" % (user, headers))


def make_users(args, workdir, cheap_pw, slow_pw, logins=True):
    users = workdir / "users.txt"
    users.write_text("# authd benchmark users\n%s:%s\n" % (CHEAP_USER, scrypt_hash(cheap_pw)))
    os.chmod(users, 0o600)
    (workdir / "bench.env").write_text("# authd benchmark: settings come from the environment\n")
    if logins:
        # the realistic, default-cost hash, made by authd itself
        env = authd_environ(os.environ, {"AUTH_USERS_FILE": str(users),
                                         "AUTH_TOKEN_SECRET": args.secret})
        cmd = list(args.authd_cmd) + ["adduser", SLOW_USER, "--users", str(users),
                                      "--env", str(workdir / "bench.env")]
        r = subprocess.run(cmd, input=slow_pw + "\n", capture_output=True, text=True,
                           env=env, cwd=str(workdir), timeout=120)
        if r.returncode != 0 or (SLOW_USER + ":$scrypt$") not in users.read_text():
            raise BenchError("`authd.py adduser` failed (status %s): %s%s"
                             % (r.returncode, r.stdout, r.stderr))
    return users


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


def plain_server(port, docroot):
    return """
    server {
        listen 127.0.0.1:%d;
        server_name localhost;
        root %s;
        location / { try_files $uri =404; }
    }
""" % (port, docroot)


def derive_server(example_text, port, authd_port, docroot, cache_dir, cache):
    """nginx.example.conf, changed by textual substitution of ports and paths only (and,
    for the micro-cache scenario, its `#~ ` lines enabled as the file says to):
    - `upstream authd` -> authd's port; any other upstream -> a dead loopback port (the
      benchmark only fetches static files, which nginx serves from `root`);
    - the TLS `listen ... ssl` line -> 127.0.0.1:PORT (plain HTTP; ssl_* lines dropped),
      any other `listen` line -> another free loopback port;
    - `root` -> the benchmark's document root; `proxy_cache_path` -> a temporary folder."""
    text = example_text
    if cache:
        text = enable_microcache(text)
    out = []
    upstream = None
    bench_listen = 0
    other_listen = 0
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
            line = re.sub(r"server\s+[^;\s]+", "server 127.0.0.1:%d" % target, line, count=1)
        elif re.match(r"listen\s", s):
            if re.search(r"\bssl\b", s.split("#")[0]):
                line = re.sub(r"listen\s+[^;]+;", "listen 127.0.0.1:%d;" % port, line)
                bench_listen += 1
            else:
                line = re.sub(r"listen\s+[^;]+;", "listen 127.0.0.1:%d;" % free_port(), line)
                other_listen += 1
        elif re.match(r"(ssl_\w+|http2)\s", s):
            continue  # no TLS on the loopback benchmark
        out.append(line)
    text = "\n".join(out) + "\n"
    if bench_listen != 1:
        raise BenchError("nginx.example.conf: expected one `listen ... ssl` line (the protected site), found %d"
                         % bench_listen)
    if "server 127.0.0.1:%d" % authd_port not in text:
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
        self.dir = workdir / name
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

    def error_log(self):
        try:
            return (self.dir / "nginx-error.log").read_text()
        except OSError:
            return ""


def http_get(port, path, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


# ---------------------------------------------------------------------------- load

def run_wrk(args, url, connections, duration, headers=(), lua_extra="", timeout_s=None):
    script = args.workdir / ("wrk-%d.lua" % secrets.randbits(32))
    script.write_text(lua_extra + WRK_LUA_DONE)
    cmd = [args.wrk, "-t1", "-c%d" % connections, "-d%ds" % max(1, round(duration)), "-s", str(script)]
    if timeout_s:
        cmd += ["--timeout", "%ds" % timeout_s]
    for h in headers:
        cmd += ["-H", h]
    cmd.append(url)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError("wrk did not finish: %s" % " ".join(cmd))
    m = re.search(r"^WRKRESULT (.*)$", r.stdout, re.M)
    if r.returncode != 0 or not m:
        raise BenchError("wrk failed (status %s): %s\n%s" % (r.returncode, " ".join(cmd), r.stdout + r.stderr))
    res = {k: float(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    errors = sum(v for k, v in res.items() if k.startswith("err_"))
    dur = res["duration_us"] / 1e6
    return {"requests": int(res["requests"]), "duration": dur,
            "rps": res["requests"] / dur if dur else 0.0,
            "p50_ms": res["p50_us"] / 1000, "p99_ms": res["p99_us"] / 1000,
            "errors": int(errors),
            "error_detail": {k[4:]: int(v) for k, v in res.items() if k.startswith("err_") and v}}


def read_response(sock, buf):
    """Read one HTTP/1.1 response; return (status, keep_alive, rest_of_buffer)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed before the response head")
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = None
    chunked = False
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        value = value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value:
            chunked = True
        elif name == b"connection" and value == b"close":
            keep = False
    if chunked:
        while True:
            while b"\r\n" not in buf:
                buf += sock.recv(65536)
            size_line, _, buf = buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(buf) < size + 2:
                buf += sock.recv(65536)
            buf = buf[size + 2:]
            if size == 0:
                break
    else:
        length = length or 0
        while len(buf) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed in the body")
            buf += chunk
        buf = buf[length:]
    return status, keep, buf


def percentile(sorted_values, pct):
    if not sorted_values:
        return 0.0
    k = max(0, min(len(sorted_values) - 1, int(round(pct / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


PACED_THREADS = 4


def run_paced(port, path, headers, rate, duration, threads=PACED_THREADS):
    """Open-loop load: `rate` requests/s spread over `threads` keep-alive connections.
    Latency runs from the scheduled send time when the connection was still busy at that
    time (no coordinated omission), else from the actual send."""
    head = "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n" % (path, port)
    head += "".join(h + "\r\n" for h in headers) + "\r\n"
    raw = head.encode("latin-1")
    interval = threads / float(rate)
    t_start = time.perf_counter() + 0.05
    t_end = t_start + duration
    lat = []
    errors = [0]
    lock = threading.Lock()

    def worker(i):
        mine = []
        sock = None
        buf = b""
        k = 0
        offset = i * interval / threads
        while True:
            intended = t_start + offset + k * interval
            if intended >= t_end:
                break
            k += 1
            now = time.perf_counter()
            if now < intended:
                time.sleep(intended - now)
                t0 = time.perf_counter()
            else:
                t0 = intended
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    buf = b""
                sock.sendall(raw)
                status, keep, buf = read_response(sock, buf)
                t1 = time.perf_counter()
                if 200 <= status < 400:
                    mine.append(t1 - t0)
                else:
                    with lock:
                        errors[0] += 1
                if not keep:
                    sock.close()
                    sock = None
            except (OSError, ValueError, IndexError):
                with lock:
                    errors[0] += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(duration + 30)
    elapsed = max(time.perf_counter() - t_start, 1e-9)
    lat.sort()
    return {"requests": len(lat), "duration": elapsed, "rps": len(lat) / min(elapsed, duration + 0.5),
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000,
            "errors": errors[0], "error_detail": {}}


# ---------------------------------------------------------------------------- scenarios

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
    """CPU and memory of the processes under test around one load run, and the CPU
    that other programs on the machine used meanwhile (a noise meter)."""

    def __init__(self, authd=None, nginx=None):
        self.authd, self.nginx = authd, nginx

    def __enter__(self):
        self.a0 = self.authd.cpu() if self.authd else 0.0
        self.n0 = self.nginx.cpu() if self.nginx else 0.0
        self.s0, self.o0, self.t0 = system_busy_seconds(), own_cpu_seconds(), time.monotonic()
        return self

    def __exit__(self, *exc):
        self.a1 = self.authd.cpu() if self.authd else 0.0
        self.n1 = self.nginx.cpu() if self.nginx else 0.0
        self.s1, self.o1, self.t1 = system_busy_seconds(), own_cpu_seconds(), time.monotonic()
        self.mem = self.authd.mem() if self.authd else None

    def annotate(self, res, noise=True):
        """Per-request CPU, RSS and, for saturating runs, the noise meter: /proc/stat is
        sampled by the tick, so at low load (the paced run) it means nothing."""
        n = max(res["requests"], 1)
        res["authd_cpu_us"] = (self.a1 - self.a0) / n * 1e6 if self.authd else None
        res["nginx_cpu_us"] = (self.n1 - self.n0) / n * 1e6 if self.nginx else None
        res["authd_rss_kib"], res["authd_hwm_kib"] = self.mem if self.mem else (None, None)
        other = (self.s1 - self.s0) - (self.o1 - self.o0)
        res["other_cpu_pct"] = max(0.0, 100.0 * other / (max(self.t1 - self.t0, 1e-3) * (os.cpu_count() or 1))) \
            if noise else None
        return res


def warmup(args, url, headers=(), lua_extra=""):
    if args.warmup > 0:
        run_wrk(args, url, 16, args.warmup, headers, lua_extra)


def verify_microcache(port, authd, cookie):
    """True when nginx answers a repeated allowed request from its cache: authd is paused
    (SIGSTOP to its PID) for the second request and resumed at once after it."""
    check_get(port, STATIC_PAGE, [cookie], 200, FILE_BODY, "(c) micro-cache warm-up")
    os.kill(authd.pid, signal.SIGSTOP)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3)
        try:
            conn.request("GET", STATIC_PAGE, headers=dict([cookie.split(": ", 1)]))
            r = conn.getresponse()
            return r.status == 200 and r.read() == FILE_BODY
        except OSError:
            return False
        finally:
            conn.close()
    finally:
        os.kill(authd.pid, signal.SIGCONT)


def check_get(port, path, headers, expect_status, expect_body=None, what=""):
    status, hdrs, body = http_get(port, path, dict(h.split(": ", 1) for h in headers))
    if status != expect_status or (expect_body is not None and body != expect_body):
        raise BenchError("%s: GET %s on port %d gave %s %r, expected %s"
                         % (what, path, port, status, body[:120], expect_status))
    return hdrs


SCENARIOS = "abcdef"


def main_run(args):
    tools = check_tools({"nginx": args.nginx, "wrk": args.wrk})
    args.wrk = tools["wrk"]
    nginx_bin = args.nginx_bin = tools["nginx"]
    sel = args.scenarios
    need_authd = bool(set(sel) - {"a"}) or bool(args.profile)
    example = Path(args.nginx_conf)
    authd_py = Path(args.authd)
    needed = ([authd_py] if need_authd else []) + ([example] if set(sel) & set("bce") else [])
    deadline = time.monotonic() + args.wait
    while not all(p.exists() for p in needed):
        if time.monotonic() >= deadline:
            raise BenchError("missing: %s" % ", ".join(str(p) for p in needed if not p.exists()))
        time.sleep(2)
    example_text = example.read_text() if example.exists() else ""
    args.authd_cmd = [args.python, str(authd_py)]
    args.secret = secrets.token_urlsafe(48)
    work = Path(tempfile.mkdtemp(prefix="authd-bench-"))
    os.chmod(work, 0o755)  # nginx workers may run as another user
    args.workdir = work
    docroot = work / "html"
    docroot.mkdir()
    os.chmod(docroot, 0o755)
    (docroot / "static").mkdir()
    os.chmod(docroot / "static", 0o755)
    (docroot / "static" / "index.html").write_bytes(FILE_BODY)
    os.chmod(docroot / "static" / "index.html", 0o644)
    cheap_pw = secrets.token_urlsafe(16)
    slow_pw = secrets.token_urlsafe(16)
    results = []
    memory = args.memory = {}
    prefix = args.prefix
    conns = args.connections
    D = args.duration
    page = STATIC_PAGE
    # what nginx's auth_request subrequest sends (see the /__auth/auth location)
    direct_headers = ["X-Original-URI: " + page, "X-Original-Host: localhost",
                      "X-Original-Remote-Addr: 127.0.0.1", "X-Real-IP: 127.0.0.1"]

    def fresh_cookie(a):
        # a new token per run: the measured path is the common one, no refresh due
        name, value = a.login(prefix, CHEAP_USER, cheap_pw)
        return "Cookie: %s=%s" % (name, value)

    def add(sid, label, nconn, res):
        res.update(id=sid, label=label, conns=nconn)
        results.append(res)
        log("%-40s c=%-3s %9.0f req/s  p50 %.3f ms  p99 %.3f ms  errors %d %s"
            % (label, nconn, res["rps"], res["p50_ms"], res["p99_ms"], res["errors"],
               res["error_detail"] or ""))

    def protected_nginx(name, a, cache):
        port = free_port()
        ng = Nginx(nginx_bin, work, name, derive_server(example_text, port, a.port, docroot,
                                                        work / ("cache-" + name), cache), port)
        st, _, body = http_get(port, page)
        if st == 200 and body == FILE_BODY:
            raise BenchError("%s: nginx served the file without a cookie: auth_request is not in force" % name)
        check_get(port, page, [fresh_cookie(a)], 200, FILE_BODY, "%s, with a valid cookie" % name)
        return ng

    try:
        log("work directory %s" % work)
        authd = None
        if need_authd:
            make_users(args, work, cheap_pw, slow_pw, logins="f" in sel)
            base_env = {"AUTH_TOKEN_SECRET": args.secret, "AUTH_CACHE_SECONDS": "0"}
            authd = Authd(args, work, base_env)

        if "a" in sel:
            port = free_port()
            ng = Nginx(nginx_bin, work, "plain", plain_server(port, docroot), port)
            url = "http://127.0.0.1:%d%s" % (port, page)
            check_get(port, page, [], 200, FILE_BODY, "(a)")
            warmup(args, url)
            for c in conns:
                with Measure(None, ng) as m:
                    res = run_wrk(args, url, c, D)
                add("a", "(a) nginx static file, no auth", c, m.annotate(res))
            stop(ng.proc)

        if "b" in sel or "e" in sel:
            ng = protected_nginx("auth", authd, cache=False)
            url = "http://127.0.0.1:%d%s" % (ng.port, page)
            if "b" in sel:
                warmup(args, url, [fresh_cookie(authd)])
                for c in conns:
                    cookie = fresh_cookie(authd)
                    with Measure(authd, ng) as m:
                        res = run_wrk(args, url, c, D, [cookie])
                    add("b", "(b) nginx + auth_request -> authd", c, m.annotate(res))
            if "e" in sel:
                cookie = fresh_cookie(authd)
                with Measure(authd, ng) as m:
                    res = run_paced(ng.port, page, [cookie], args.rate, D)
                add("e-nginx", "(e) paced %d/s, nginx + authd" % args.rate, PACED_THREADS, m.annotate(res, noise=False))
            stop(ng.proc)

        if "d" in sel or "e" in sel:
            url = "http://127.0.0.1:%d%s/auth" % (authd.port, prefix)
            check_get(authd.port, prefix + "/auth", direct_headers, 401, b"", "(d), without a cookie")
            check_get(authd.port, prefix + "/auth", [fresh_cookie(authd)] + direct_headers, 200, b"", "(d)")
            if "d" in sel:
                warmup(args, url, [fresh_cookie(authd)] + direct_headers)
                for c in conns:
                    cookie = fresh_cookie(authd)
                    with Measure(authd, None) as m:
                        res = run_wrk(args, url, c, D, [cookie] + direct_headers)
                    add("d", "(d) authd %s/auth directly" % prefix, c, m.annotate(res))
            if "e" in sel:
                cookie = fresh_cookie(authd)
                with Measure(authd, None) as m:
                    res = run_paced(authd.port, prefix + "/auth", [cookie] + direct_headers, args.rate, D)
                add("e-direct", "(e) paced %d/s, authd directly" % args.rate, PACED_THREADS, m.annotate(res, noise=False))

        if args.profile:
            profile_authd(args, authd, "http://127.0.0.1:%d%s/auth" % (authd.port, prefix),
                          [fresh_cookie(authd)] + direct_headers)

        if "c" in sel:
            authd_c = Authd(args, work, dict(base_env, AUTH_CACHE_SECONDS=str(args.cache_seconds)), "authd-cache")
            ng = protected_nginx("cache", authd_c, cache=True)
            cache_ok = verify_microcache(ng.port, authd_c, fresh_cookie(authd_c))
            if not cache_ok:
                log("WARNING: (c): nginx did not answer from the micro-cache while authd was paused")
            url = "http://127.0.0.1:%d%s" % (ng.port, page)
            warmup(args, url, [fresh_cookie(authd_c)])
            for c in conns:
                cookie = fresh_cookie(authd_c)
                with Measure(authd_c, ng) as m:
                    res = run_wrk(args, url, c, D, [cookie])
                res["cache_verified"] = cache_ok
                add("c", "(c) nginx + auth_request + micro-cache", c, m.annotate(res))
            stop(ng.proc)
            stop(authd_c.proc)

        if authd:
            memory["after_auth_kib"] = authd.mem()
        if "f" in sel:
            # last: the default-cost hash takes 128 MiB per concurrent login, which
            # would otherwise show in the RSS of the rows after it
            body = json.dumps({"username": SLOW_USER, "password": slow_pw})
            lua = ('wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n'
                   % lua_string(body))
            url = "http://127.0.0.1:%d%s/login" % (authd.port, prefix)
            with Measure(authd, None) as m:
                res = run_wrk(args, url, args.login_connections, max(D, 3), lua_extra=lua, timeout_s=30)
            add("f", "(f) logins/s, default-cost scrypt", args.login_connections, m.annotate(res))
            time.sleep(1.0)  # let the logins still queued finish
            memory["after_logins_kib"] = authd.mem()
        if authd:
            stop(authd.proc)
    finally:
        stop_all()
        if args.keep:
            log("kept %s" % work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return results


def profile_authd(args, authd, url, headers):
    """py-spy samples authd (attached by PID) while wrk hits P/auth directly; writes the
    raw stacks to FILE and prints the top functions by own and by inclusive time."""
    spy = find_tool("py-spy")
    if not spy:
        raise BenchError("--profile needs py-spy (pip install py-spy)")
    conns = args.connections[0]
    raw = Path(args.profile)
    cmd = [spy, "record", "-p", str(authd.pid), "-r", str(args.profile_rate), "--nonblocking"] + ([] if args.profile_lines else ["-F"]) + ["-f", "raw", "-o", str(raw),
           "-d", str(args.duration + 1)]
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


def lua_string(s):
    return '"' + "".join(c if c.isalnum() or c in " {}:,._-" else "\\%03d" % ord(c) for c in s) + '"'


# ---------------------------------------------------------------------------- report

ORDER = ["a", "b", "c", "d", "e-nginx", "e-direct", "f"]


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
            "python": platform.python_version()}


def report(args, results, out=sys.stdout):
    mi = machine_info()
    w = out.write
    w("authd benchmark: %s; %d CPUs (%s); Linux %s\n" % (time.strftime("%Y-%m-%d"), mi["nproc"], mi["cpu"], mi["kernel"]))
    w("authd on %s %s; %s; %s; wrk -t1, %g s per run, nginx worker_processes 1, access_log off\n"
      % (Path(args.python).name, args.python_version, tool_version([args.nginx_bin, "-v"]).replace("nginx version: ", ""),
         tool_version([args.wrk, "--version"]).split(" [")[0], args.duration))
    w("\n")
    hdr = "%-41s %5s %9s %8s %8s %9s %9s %15s %6s %6s\n"
    row = "%-41s %5d %9s %8.3f %8.3f %9s %9s %15s %6d %6s\n"
    w(hdr % ("scenario", "conns", "req/s", "p50 ms", "p99 ms", "authd", "nginx", "authd RSS/peak", "errors", "other"))
    w(hdr % ("", "", "", "", "", "us/req", "us/req", "MiB", "", "CPU %"))
    rows = sorted(results, key=lambda r: (ORDER.index(r["id"]), r["conns"]))
    for r in rows:
        mem = "-" if r["authd_rss_kib"] is None else "%.1f/%.1f" % (r["authd_rss_kib"] / 1024, r["authd_hwm_kib"] / 1024)
        w(row % (
            r["label"], r["conns"], fmt(r["rps"], ".0f" if r["rps"] >= 100 else ".1f"), r["p50_ms"], r["p99_ms"],
            fmt(r["authd_cpu_us"], ".0f"), fmt(r["nginx_cpu_us"], ".0f"), mem, r["errors"], fmt(r["other_cpu_pct"], ".1f")))
    w("\n")
    if any((r["other_cpu_pct"] or 0) > 10 for r in rows):
        w("note: other programs used the CPU during some runs (column 'other CPU %'); those figures are noisy\n")
    by = {(r["id"], r["conns"]): r for r in results}
    ratios = {}
    for r in rows:
        if r.get("cache_verified") is False:
            w("WARNING: (c) nginx did not answer from its micro-cache while authd was paused: "
              "the cache is not in effect\n")
            break
    for num in ("b", "c"):
        parts = []
        for c in args.connections:
            a, x = by.get(("a", c)), by.get((num, c))
            if a and x and a["rps"] > 0:
                ratio = x["rps"] / a["rps"]
                ratios["%s/a@%d" % (num, c)] = ratio
                parts.append("%.1f %% at %d conns" % (100 * ratio, c))
        if parts:
            w("ratio (%s)/(a): %s\n" % (num, ", ".join(parts)))
    mem = getattr(args, "memory", {})
    notes = []
    if mem.get("after_auth_kib"):
        notes.append("RSS %.1f MiB (peak %.1f) after the auth runs" % tuple(v / 1024 for v in mem["after_auth_kib"]))
    if mem.get("after_logins_kib"):
        notes.append("RSS %.1f MiB (peak %.1f) after the logins" % tuple(v / 1024 for v in mem["after_logins_kib"]))
    if notes:
        w("authd memory: %s\n" % "; ".join(notes))
    return ratios


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Benchmark authd behind nginx auth_request, on loopback, in one run. "
                    "Needs nginx and wrk (%s)." % INSTALL_HINT,
        epilog="Rows: (a) nginx static file; (b) + auth_request to authd per nginx.example.conf; "
               "(c) + the micro-cache; (d) authd P/auth directly; (e) paced latency run; "
               "(f) logins/s with the default-cost hash.")
    p.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="seconds of warm-up before a scenario (default 1; 0 with --tiny)")
    p.add_argument("--tiny", action="store_true", help="about a second per scenario (used by test_bench.py)")
    p.add_argument("--connections", default="16,64", help="comma list of wrk connection counts (default 16,64)")
    p.add_argument("--rate", type=int, default=500, help="paced run: requests per second (default 500)")
    p.add_argument("--login-connections", type=int, default=4, help="concurrent logins in (f) (default 4)")
    p.add_argument("--scenarios", default=SCENARIOS, help="which of a,b,c,d,e,f to run (default all: abcdef)")
    p.add_argument("--cache-seconds", type=int, default=10, help="AUTH_CACHE_SECONDS for (c) (default 10)")
    p.add_argument("--authd", default=str(ROOT / "authd.py"), help="authd.py to run (default: the repository's)")
    p.add_argument("--nginx-conf", default=str(ROOT / "nginx.example.conf"), help="nginx example config to derive from")
    p.add_argument("--python", default=sys.executable, help="interpreter for authd (default: this one)")
    p.add_argument("--prefix", default="/__auth", help="AUTH_PREFIX (default /__auth)")
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
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = p.parse_args(argv)
    if args.tiny:
        args.duration = 1
        if args.warmup is None:
            args.warmup = 0
    if args.warmup is None:
        args.warmup = 1.0
    args.scenarios = "".join(ch for ch in args.scenarios if ch.isalpha())
    if not args.scenarios or set(args.scenarios) - set(SCENARIOS):
        p.error("--scenarios: letters from %s" % SCENARIOS)
    try:
        args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        p.error("--connections: a comma list of numbers")
    if not args.connections or min(args.connections) < 1 or args.duration <= 0 or args.rate < 1:
        p.error("connections, duration and rate must be positive")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        args.python_version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                                             capture_output=True, text=True, timeout=30).stdout.strip() or "?"
        results = main_run(args)
    except BenchError as e:
        print("bench: error: %s" % e, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        stop_all()
        print("bench: interrupted", file=sys.stderr)
        return 130
    ratios = report(args, results)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine_info(), "duration": args.duration,
                                               "connections": args.connections, "rate": args.rate,
                                               "results": results, "ratios": ratios,
                                               "memory": args.memory}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
