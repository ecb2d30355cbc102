"""Shared fixtures: a real authd.py subprocess and plain HTTP to it."""
import http.client
import json
import os
import re
import signal
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


def fast_hash(password, rounds=4):
    """A cheap but real scrypt hash made by libpass; authd reads parameters from the hash."""
    from passlib.hash import scrypt
    return scrypt.using(rounds=rounds).hash(password)


def write_users(path, lines, mode=0o600):
    path = Path(path)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.chmod(path, mode)
    return path


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


class Authd:
    """authd.py running as a subprocess on a free loopback port."""

    def __init__(self, workdir, users=None, env=None, args=(), secret=SECRET,
                 python=sys.executable, wait=True):
        self.workdir = Path(workdir)
        self.users_file = self.workdir / "users.txt"
        if users is not None:
            write_users(self.users_file, users)
        self.secret = secret
        self.env_file = self.workdir / ".env"
        if not self.env_file.exists():
            self.env_file.write_text("")
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("AUTH_", "LISTEN_", "NOTIFY_", "JOURNAL_"))}
        environ.update({"AUTH_COOKIE_SECURE": "true", "PYTHONUNBUFFERED": "1"})
        if secret is not None:
            environ["AUTH_TOKEN_SECRET"] = secret
        environ.update(env or {})
        self.environ = environ
        cmd = [python, str(AUTHD), "serve", "--users", str(self.users_file),
               "--env", str(self.env_file), "--port", "0"] + list(args)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=environ, cwd=str(self.workdir),
                                     pass_fds=getattr(self, "pass_fds", ()))
        self._lines = []
        self._ready = threading.Event()
        self.port = None
        self.url = None
        threading.Thread(target=self._drain, daemon=True).start()
        if wait:
            self.wait_ready()

    def _drain(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace")
            self._lines.append(line)
            m = re.search(r"listening on http://(\S+):(\d+)", line)
            if m and self.port is None:
                self.host, self.port = m.group(1), int(m.group(2))
                self.url = "http://%s:%d" % (self.host, self.port)
                self._ready.set()
            elif "listening on" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout=15):
        self._ready.wait(timeout)
        if self.port is None and "listening on" not in self.log():
            self.stop()
            raise RuntimeError("authd did not start:\n" + self.log())

    def log(self):
        return "".join(self._lines)

    def wait_log(self, pattern, timeout=10):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if re.search(pattern, self.log()):
                return True
            time.sleep(0.02)
        raise AssertionError("log never matched %r:\n%s" % (pattern, self.log()))

    def connect(self, timeout=10):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method, path, headers=None, body=None, conn=None):
        own = conn is None
        conn = conn or self.connect()
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = dict({"Content-Type": "application/json"}, **(headers or {}))
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return Response(resp.status, resp.getheaders(), resp.read())
        finally:
            if own:
                conn.close()

    def login(self, name, password, expect=200):
        r = self.request("POST", "/__auth/login", body={"username": name, "password": password})
        assert r.status == expect, r
        return r.cookie()

    def auth(self, token, path="/__auth/auth", headers=None):
        h = {"Cookie": "authToken=" + token} if token else {}
        h.update(headers or {})
        return self.request("GET", path, headers=h)

    def stop(self, sig=signal.SIGTERM, timeout=10):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def authd(tmp_path):
    """Factory: authd(users=[...], env={...}, args=[...]) -> a running Authd."""
    started = []

    def start(users=None, **kwargs):
        d = Authd(tmp_path, users=users, **kwargs)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def run_cli(*args, input=None, env=None, cwd=None, timeout=60):
    """Run `authd.py ARGS` to completion; returns CompletedProcess with text output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AUTH_")}
    environ.update(env or {})
    return subprocess.run([sys.executable, str(AUTHD)] + [str(a) for a in args],
                          input=input, capture_output=True, text=True, env=environ,
                          cwd=cwd, timeout=timeout)
