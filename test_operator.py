"""A first-time operator's friction (issue 9, items 10-16), each as a regression test.

10  the upstream Express project (andygock/auth-server) as a drop-in: endpoints at the
    root, one AUTH_PASSWORD as the user `user`, AUTH_COOKIE_OVERRIDES, the secret's
    minimum explained; end to end with the upstream README's own nginx block and an
    upstream-style .env (shared fixtures), in Chromium and with the JSON API
11  logged-out requests keep their 401 through nginx.example.conf (status and page)
12  a Secure cookie sent over plain http is explained on the page
13  `check` and `adduser` tell the truth; a non-loopback bind is warned about
14  missing credentials are 401 "Invalid credentials", like wrong ones
15  README: how to run the test command on a PEP 668 system (Debian 12)
16  small page fixes: "You are signed out", the rate-limit page keeps the name, the
    who-am-I page links back to the site

Real parts only: authd.py as a subprocess, the real nginx, Debian's Chromium through
Playwright (conftest.py's nginx and browser helpers, test_e2e.py's site).
"""
import http.client
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from conftest import (HERE, SECRET, Authd, auth_cookie, fast_hash, free_port, login_in_browser, need, run_cli,
                      send, start_nginx, stop_all, substitute, wait_until, write_users)
# The end-to-end suite's site (nginx.example.conf); a fixture must be an importable
# name here for pytest to find it.
from test_e2e import PASSWORDS, is_login_page, site  # noqa: F401

README = HERE / "README.md"
FIXTURES = HERE.parent / "shared" / "fixtures"   # CI keeps a copy of shared/ beside the clone
UPSTREAM_NGINX = FIXTURES / "upstream-express-nginx.conf"
UPSTREAM_ENV = FIXTURES / "upstream-express.env"
UPSTREAM_PASSWORD = "correct-horse-battery-staple"   # AUTH_PASSWORD in upstream-express.env
P = "/__auth"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
INVALID = {"status": "fail", "message": "Invalid credentials"}
TEST_COMMAND = "python3 -m pip install -q -r requirements-test.txt && python3 -m pytest -q"


def form(**fields):
    return urllib.parse.urlencode(fields).encode()


def cli(tmp_path, *args, input=None, env=None):
    environ = {"AUTH_TOKEN_SECRET": SECRET}
    environ.update(env or {})
    return run_cli(*args, input=input, env=environ, cwd=str(tmp_path))


def cookie_attributes(set_cookie):
    """'a=b; Path=/; SameSite=Strict' -> {'path': '/', 'samesite': 'strict'} (lower case)."""
    attributes = {}
    for part in set_cookie.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        attributes[key.lower()] = value.lower()
    return attributes


# ===========================================================================
# 10. the upstream Express project as a drop-in
# ===========================================================================

def test_empty_prefix_serves_every_endpoint_at_the_root(authd):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")], env={"AUTH_PREFIX": ""})
    assert d.request("GET", "/healthz").status == 200
    r = d.request("POST", "/login", body={"username": "alice", "password": "alice-pw-1"})
    assert r.status == 200 and r.json() == {"status": "ok", "user": "alice"}, r
    token = r.cookie()
    r = d.request("GET", "/auth", headers={"Cookie": "authToken=" + token})
    assert r.status == 200 and r.headers["x-auth-user"] == "alice", r
    assert d.request("GET", "/auth").status == 401
    r = d.request("GET", "/logged-in", headers={"Cookie": "authToken=" + token})
    assert r.status == 200 and b"alice" in r.body, r
    r = d.request("GET", "/logout", headers={"Cookie": "authToken=" + token})
    assert r.status == 303 and r.headers["location"].startswith("/login"), r
    assert d.request("GET", P + "/auth").status == 404  # only the root now
    # the login page posts to the root, and returns to the page nginx asked about
    r = d.request("GET", "/login", headers={"X-Original-URI": "/reports/q3?full=1"})
    assert r.status == 200 and 'action="/login"' in r.body.decode(), r
    assert 'name="rd" value="/reports/q3?full=1"' in r.body.decode(), r.body
    # ...but never to one of authd's own pages (a direct visit to /login), which would loop
    for own in ("/login", "/logout", "/logged-in"):
        r = d.request("GET", "/login", headers={"X-Original-URI": own})
        assert 'name="rd" value="/"' in r.body.decode(), (own, r.body)
        r = d.request("GET", "/login", headers={"X-Original-URI": own, "Cookie": "authToken=" + token})
        assert r.status == 303 and r.headers["location"] == "/", (own, r)


def test_auth_password_is_the_user_named_user_while_there_are_no_users(authd, tmp_path):
    d = authd(env={"AUTH_PASSWORD": UPSTREAM_PASSWORD})  # no users file at all, as upstream
    assert re.search(r"AUTH_PASSWORD.*adduser", d.log()), d.log()  # says how to replace it
    for body in ({"password": UPSTREAM_PASSWORD}, {"username": "user", "password": UPSTREAM_PASSWORD}):
        r = d.request("POST", P + "/login", body=body)
        assert r.status == 200 and r.json() == {"status": "ok", "user": "user"}, (body, r)
    token = r.cookie()
    r = d.request("GET", P + "/auth", headers={"Cookie": "authToken=" + token})
    assert r.status == 200 and r.headers["x-auth-user"] == "user", r
    for body in ({"password": "wrong-password"}, {"username": "bob", "password": UPSTREAM_PASSWORD}):
        r = d.request("POST", P + "/login", body=body)
        assert r.status == 401 and r.json() == INVALID, (body, r)
    # the login form names the one user, so that only the password is asked
    r = d.request("GET", P + "/login")
    assert 'value="user"' in r.body.decode(), r.body
    r = d.request("POST", P + "/login", headers=FORM, body=form(username="user", password=UPSTREAM_PASSWORD, rd="/x"))
    assert r.status == 303 and r.headers["location"] == "/x" and r.cookie(), r
    # the first real user ends that mode: `user` and its sessions are gone
    write_users(tmp_path / "users.txt", ["alice:" + fast_hash("alice-pw-1")])
    assert wait_until(lambda: d.request("GET", P + "/auth", headers={"Cookie": "authToken=" + token}).status == 401)
    r = d.request("POST", P + "/login", body={"password": UPSTREAM_PASSWORD})
    assert r.status == 401 and r.json() == INVALID, r
    d.login("alice", "alice-pw-1")


def test_auth_password_is_ignored_when_the_users_file_has_users(authd):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")], env={"AUTH_PASSWORD": UPSTREAM_PASSWORD})
    assert "AUTH_PASSWORD" in d.log(), d.log()  # said at start, not silently dropped
    for body in ({"password": UPSTREAM_PASSWORD}, {"username": "user", "password": UPSTREAM_PASSWORD},
                 {"password": "alice-pw-1"}):  # no user name: `user` in password mode only
        r = d.request("POST", P + "/login", body=body)
        assert r.status == 401 and r.json() == INVALID, (body, r)
    d.login("alice", "alice-pw-1")


def test_cookie_overrides_map_domain_and_samesite_and_name_the_rest(authd, tmp_path):
    (tmp_path / ".env").write_text(
        'AUTH_COOKIE_OVERRIDES={"domain": "example.test", "sameSite": "strict", "path": "/app", "maxAge": 5}\n')
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])
    r = d.request("POST", P + "/login", body={"username": "alice", "password": "alice-pw-1"})
    (set_cookie,) = r.header_values("set-cookie")
    attributes = cookie_attributes(set_cookie)
    assert attributes["domain"].lstrip(".") == "example.test" and attributes["samesite"] == "strict", set_cookie
    assert attributes["path"] == "/", set_cookie
    warning = [line for line in d.log().splitlines() if "AUTH_COOKIE_OVERRIDES" in line]
    assert warning and "path" in warning[0] and "maxAge" in warning[0], d.log()


@pytest.mark.parametrize("value", ['{"sameSite": ', '["domain"]', '{"sameSite": "sideways"}'])
def test_cookie_overrides_that_make_no_sense_are_an_error(tmp_path, value):
    """check reads the settings as the start-up does (and exits at once)."""
    write_users(tmp_path / "users.txt", ["zed:" + fast_hash("zed-pw-1")])
    cp = cli(tmp_path, "check", "--users", tmp_path / "users.txt", env={"AUTH_COOKIE_OVERRIDES": value})
    assert cp.returncode != 0 and "AUTH_COOKIE_OVERRIDES" in cp.stderr, cp
    assert "Traceback" not in cp.stderr


def test_short_secret_is_refused_saying_why_and_how(tmp_path):
    cp = cli(tmp_path, "serve", "--port", "0", "--users", tmp_path / "users.txt",
             env={"AUTH_TOKEN_SECRET": "verysecret"})  # the upstream README's Docker example
    assert cp.returncode != 0, cp
    assert "AUTH_TOKEN_SECRET" in cp.stderr and "32" in cp.stderr, cp.stderr
    assert "secrets.token_urlsafe" in cp.stderr, cp.stderr          # how to make one
    assert re.search(r"guess", cp.stderr, re.I), cp.stderr          # why: a short key is guessed offline
    assert "verysecret" not in cp.stderr


# ---- end to end: the upstream README's nginx block and .env, unchanged -------

UPSTREAM_INDEX = (b'<!doctype html><html><head><title>Upstream site</title>'
                  b'<link rel="stylesheet" href="/site.css"></head>'
                  b'<body><h1 id="marker">Upstream site</h1></body></html>\n')
UPSTREAM_CSS = b"#marker { color: rgb(7, 8, 9); }\n"


class UpstreamSite:
    """authd started with upstream-express.env (AUTH_PORT substituted), behind nginx
    running upstream-express-nginx.conf inside a plain-http server block (the port
    3000 and the site's root substituted), over a small static site."""

    def __init__(self, workdir):
        self.workdir = workdir = Path(workdir)
        self.authd = self.nginx = None
        try:
            self.root = workdir / "www"
            self.root.mkdir()
            (self.root / "index.html").write_bytes(UPSTREAM_INDEX)
            (self.root / "site.css").write_bytes(UPSTREAM_CSS)
            self._start_authd()
            self._start_nginx()
        except BaseException:
            self.stop()
            raise
        self.url = "http://127.0.0.1:%d" % self.http_port

    def _start_authd(self):
        for attempt in range(3):  # a free port may be taken before authd binds it
            folder = self.workdir / ("authd%d" % attempt)
            folder.mkdir()
            self.authd_port = free_port()
            (folder / ".env").write_text(substitute(UPSTREAM_ENV.read_text(), "AUTH_PORT=3000",
                                                    "AUTH_PORT=%d" % self.authd_port))
            try:
                self.authd = Authd(folder, users=None, args=(), secret=None)  # the .env alone decides
            except AssertionError as e:
                if "Address already in use" not in str(e):
                    raise
                continue
            if self.authd.port == self.authd_port:
                return
            self.authd.stop()
        raise RuntimeError("authd could not bind a free port")

    def _start_nginx(self):
        block = substitute(UPSTREAM_NGINX.read_text(), "http://localhost:3000;",
                           "http://localhost:%d;" % self.authd_port, count=3)
        site = lambda directory, port: ("server {\n    listen 127.0.0.1:%d;\n    server_name localhost;\n"  # noqa: E731
                                        "    root %s;\n%s\n}\n" % (port, self.root, block))
        self.nginx, _, (self.http_port,) = start_nginx(self.workdir, site, ports=1)

    def fetch(self, method, path, headers=None, body=None, token=None):
        headers = dict(headers or {})
        if token is not None:
            headers["Cookie"] = "authToken=" + token
        return send(http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=20), method, path, headers, body)

    def stop(self):
        stop_all(self.nginx, self.authd)


@pytest.fixture
def upstream(nginx_tools, tmp_path):
    need(UPSTREAM_NGINX.exists() and UPSTREAM_ENV.exists(), "the shared fixtures are missing: %s" % FIXTURES)
    s = UpstreamSite(tmp_path)
    yield s
    s.stop()


def test_upstream_nginx_block_and_env_in_chromium(upstream, new_context):
    s = upstream
    ctx = new_context()
    page = ctx.new_page()
    resp = page.goto(s.url + "/some/page")
    assert resp.status == 401, (resp.status, s.authd.log())       # error_page 401 /login keeps the 401
    assert page.get_by_label("User name").input_value() == "user"  # only the password is asked
    page.get_by_label("Password").fill(UPSTREAM_PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(s.url + "/some/page")
    assert page.locator("h1").inner_text() == "Upstream site"       # try_files -> /index.html
    page.wait_for_load_state("load")
    assert page.locator("#marker").evaluate("e => getComputedStyle(e).color") == "rgb(7, 8, 9)"
    cookie = auth_cookie(ctx)
    assert cookie and cookie["httpOnly"] and not cookie["secure"], cookie  # AUTH_COOKIE_SECURE=false
    assert cookie["sameSite"] == "Strict", cookie                          # AUTH_COOKIE_OVERRIDES
    page.goto(s.url + "/logged-in")
    assert "user" in page.locator("main").inner_text()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(re.escape(s.url) + r"/login(\?.*)?$"))
    assert auth_cookie(ctx) is None
    resp = page.goto(s.url + "/some/page")
    assert resp.status == 401 and page.get_by_label("Password").is_visible()
    assert "Upstream site" not in page.content()
    assert re.search(r"AUTH_PASSWORD.*adduser", s.authd.log()), s.authd.log()  # how to leave that mode


def test_upstream_nginx_block_and_env_with_the_json_api(upstream):
    s = upstream
    r = s.fetch("GET", "/index.html")
    assert r.status == 401 and b'name="password"' in r.body and b'action="/login"' in r.body, r
    assert s.fetch("GET", "/site.css").status == 401                # the regex location asks authd too
    assert s.fetch("GET", "/auth").status == 404                    # internal
    r = s.fetch("POST", "/login", body={"password": "wrong"})
    assert r.status == 401 and r.json() == INVALID, r
    r = s.fetch("POST", "/login", body={"password": UPSTREAM_PASSWORD})  # the upstream page's request
    assert r.status == 200 and r.json() == {"status": "ok", "user": "user"}, r
    token = r.cookie()
    r = s.fetch("GET", "/index.html", token=token)
    assert r.status == 200 and r.body == UPSTREAM_INDEX, r
    assert s.fetch("GET", "/site.css", token=token).body == UPSTREAM_CSS
    r = s.fetch("POST", "/logout", token=token, headers={"Accept": "application/json"})
    assert r.status in (200, 303) and r.cookie() == "", r


# ===========================================================================
# 11. a logged-out request keeps its 401 (nginx.example.conf)
# ===========================================================================

def test_logged_out_request_keeps_401_with_the_login_page(site):
    for method, path in (("GET", "/some/page?x=1"), ("GET", "/static/site.css"), ("GET", "/admin/panel")):
        r = site.fetch(method, path)
        assert r.status == 401 and is_login_page(r.body), (path, r)
        assert "www-authenticate" not in r.headers  # never a browser password dialog
    assert site.fetch("HEAD", "/some/page").status == 401
    assert site.fetch("GET", "/__auth/login").status == 200  # the page itself, asked for directly


def test_logged_out_request_keeps_401_in_chromium(site, new_context):
    page = new_context().new_page()
    resp = page.goto(site.url + "/some/page?x=1")
    assert resp.status == 401
    assert page.get_by_label("User name").is_visible() and page.get_by_label("Password").is_visible()
    login_in_browser(page, "carol", PASSWORDS["carol"])
    page.wait_for_url(site.url + "/some/page?x=1")
    assert page.locator("h1").inner_text() == "App page /some/page?x=1"


# ===========================================================================
# 12. a Secure cookie over plain http is explained
# ===========================================================================

SECURE_WORDS = ("https", "AUTH_COOKIE_SECURE")


def test_secure_cookie_over_plain_http_is_explained_on_the_page(authd):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])  # AUTH_COOKIE_SECURE=true
    body = form(username="alice", password="alice-pw-1", rd="/x")
    r = d.request("POST", P + "/login", body=body,
                  headers=dict(FORM, Host="intranet.example", **{"X-Forwarded-Proto": "http"}))
    assert r.headers.get("content-type", "").startswith("text/html"), r
    text = r.body.decode()
    for word in SECURE_WORDS:
        assert word in text, (word, text)
    # over https, or on localhost (where browsers keep Secure cookies), nothing changes
    for headers in ({"Host": "intranet.example", "X-Forwarded-Proto": "https"},
                    {"Host": "localhost:8080", "X-Forwarded-Proto": "http"}):
        r = d.request("POST", P + "/login", body=body, headers=dict(FORM, **headers))
        assert r.status == 303 and r.headers["location"] == "/x", (headers, r)


def test_secure_cookie_over_plain_http_is_explained_in_chromium(authd, new_context):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])
    ctx = new_context(extra_http_headers={"X-Forwarded-Proto": "http"})  # as nginx says for http://
    page = ctx.new_page()
    page.goto("http://example.com:%d%s/login" % (d.port, P))  # example.com is 127.0.0.1 for this browser
    login_in_browser(page, "alice", "alice-pw-1")
    page.wait_for_load_state("load")
    text = page.locator("body").inner_text()
    for word in SECURE_WORDS:
        assert word in text, (word, text)
    assert auth_cookie(ctx) is None  # what the words explain: the browser dropped the cookie


# ===========================================================================
# 13. check and adduser tell the truth; a non-loopback bind is warned about
# ===========================================================================

REAL_BCRYPT = "$2y$05$CbYwIEu14oBAT3vJC49I7.FeFqTgXk//yUn4B6wnk3hCtswVC6Hke"  # htpasswd -nbB -C 5 carol carol-pw-123
DES_LINE = "dave:coXWzeSJtTGB."                                          # htpasswd -nbd dave davepw


def check(tmp_path, users, *extra, env=None):
    cp = cli(tmp_path, "check", "--users", users, "--env", tmp_path / ".env", *extra, env=env)
    assert "Traceback" not in cp.stdout + cp.stderr, cp
    return cp, cp.stdout + cp.stderr


@pytest.fixture
def env_file(tmp_path):
    (tmp_path / ".env").write_text("")


def test_check_says_a_mistyped_users_file_does_not_exist(tmp_path, env_file):
    missing = tmp_path / "etc" / "user.txt"
    cp, out = check(tmp_path, missing)
    assert "does not exist" in out and str(missing) in out, out
    assert cp.returncode == 1, out
    # with AUTH_PASSWORD (the upstream project's layout) no users file is needed
    cp, out = check(tmp_path, missing, env={"AUTH_PASSWORD": UPSTREAM_PASSWORD})
    assert cp.returncode == 0 and "adduser" in out, out


def test_check_hint_names_the_users_file(tmp_path, env_file):
    users = write_users(tmp_path / "members.txt", ["# nobody yet"])
    cp, out = check(tmp_path, users)
    assert cp.returncode == 0, out
    assert "adduser NAME --users %s" % users in out, out


def test_check_lists_warnings_along_with_errors(tmp_path):
    (tmp_path / ".env").write_text("AUTH_PASWORD=typo-in-the-key\nAUTH_PORT=eighty\n")
    users = write_users(tmp_path / "users.txt", [DES_LINE, "broken line", "zed:" + fast_hash("zed-pw-1")])
    cp, out = check(tmp_path, users)
    assert cp.returncode == 1, out
    for word in ("AUTH_PASWORD", "AUTH_PORT", "import-htpasswd", "line 2"):
        assert word in out, (word, out)


def test_check_refuses_a_malformed_bcrypt_hash(tmp_path, env_file):
    users = write_users(tmp_path / "users.txt", ["carol:" + REAL_BCRYPT, "kim:$2y$05$broken"])
    cp, out = check(tmp_path, users)
    assert cp.returncode == 1 and "line 2" in out and "bcrypt" in out, out
    assert "line 1" not in out, out  # a real bcrypt line is fine
    cp = cli(tmp_path, "serve", "--port", "0", "--users", users, "--env", tmp_path / ".env")
    assert cp.returncode != 0 and "line 2" in cp.stderr, cp


def test_check_warns_about_a_des_line_typed_by_hand(tmp_path, env_file):
    users = write_users(tmp_path / "users.txt", ["zed:" + fast_hash("zed-pw-1"), DES_LINE])
    cp, out = check(tmp_path, users)
    assert cp.returncode == 0, out
    warning = [line for line in out.splitlines() if "import-htpasswd" in line]
    assert warning and "dave" in warning[0] and "line 2" in warning[0], out


def test_trailing_white_space_after_a_plaintext_password_is_stripped_and_said(tmp_path, env_file, authd):
    users = write_users(tmp_path / "users.txt", ["erin:secret-pw-9  ", "finn:other-pw-9\t:staff"])
    cp, out = check(tmp_path, users)
    assert cp.returncode == 0, out
    assert re.search(r"white ?space.*erin|erin.*white ?space", out, re.I), out
    assert re.search(r"white ?space.*finn|finn.*white ?space", out, re.I), out
    d = authd()
    assert re.search(r"white ?space", d.log(), re.I), d.log()
    d.login("erin", "secret-pw-9")
    d.login("finn", "other-pw-9")
    d.login("erin", "secret-pw-9  ", expect=401)


@pytest.mark.parametrize("command", ["adduser", "passwd"])
def test_new_passwords_need_8_characters_unless_allowed(tmp_path, command):
    users = write_users(tmp_path / "users.txt", ["zed:" + fast_hash("zed-pw-1")])
    name = (lambda n: "bob%d" % n) if command == "adduser" else (lambda n: "zed")
    before = users.read_text()
    cp = cli(tmp_path, command, name(1), "--users", users, input="x\n")
    assert cp.returncode != 0 and "8" in cp.stderr and "--allow-short" in cp.stderr, cp
    assert users.read_text() == before
    cp = cli(tmp_path, command, name(2), "--users", users, input="8-chars!\n")
    assert cp.returncode == 0, cp
    after = users.read_text()
    cp = cli(tmp_path, command, name(3), "--allow-short", "--users", users, input="x\n")
    assert cp.returncode == 0, cp
    assert users.read_text() != after


def test_binding_a_non_loopback_address_is_warned_about(authd, tmp_path):
    quiet = authd(users=["zed:" + fast_hash("zed-pw-1")])
    assert "loopback" not in quiet.log(), quiet.log()
    quiet.stop()
    loud = authd(users=["zed:" + fast_hash("zed-pw-1")], env={"AUTH_HOST": "0.0.0.0"})
    warning = [line for line in loud.log().splitlines() if "0.0.0.0" in line and "loopback" in line]
    assert warning and "AUTH_HOST" in warning[0], loud.log()


# ===========================================================================
# 14. missing credentials are wrong credentials: 401
# ===========================================================================

@pytest.mark.parametrize("body", [{}, {"username": "alice"}, {"password": "alice-pw-1"},
                                  {"username": "", "password": ""}, {"username": "alice", "password": ""},
                                  {"username": 5, "password": "alice-pw-1"}, {"username": None, "password": None}])
def test_missing_credentials_in_json_are_401(authd, body):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])
    r = d.request("POST", P + "/login", body=body)
    assert r.status == 401 and r.json() == INVALID, (body, r)


@pytest.mark.parametrize("fields", [{}, {"username": "alice"}, {"password": "alice-pw-1"},
                                    {"username": "", "password": ""}, {"username": "alice", "password": ""}])
def test_missing_credentials_in_the_form_are_401_with_the_message(authd, fields):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])
    r = d.request("POST", P + "/login", headers=FORM, body=form(**fields))
    assert r.status == 401 and is_login_page(r.body), (fields, r)
    assert 'role="alert"' in r.body.decode(), r.body
    if fields.get("username"):
        assert 'value="alice"' in r.body.decode()


# ===========================================================================
# 15. README: the test command on a PEP 668 system
# ===========================================================================

def test_readme_says_how_to_run_the_tests_on_debian_12(tmp_path):
    text = README.read_text()
    assert TEST_COMMAND in text  # CI runs exactly this
    assert re.search(r"PEP 668|externally-managed-environment", text), "README must name the error"
    assert "python3-venv" in text  # Debian's python3 makes no venv without it
    m = re.search(r"^(python3 -m venv (\S+) && \. (\S+)/bin/activate)$", text, re.M)
    assert m and m.group(2) == m.group(3), "a venv in one line, then the test command"
    # the line works: afterwards `python3` is the venv's
    line = m.group(1).replace("python3 -m venv", "%s -m venv --without-pip" % sys.executable, 1)
    out = subprocess.run(["bash", "-c", line + " && python3 -c 'import sys; print(sys.prefix)'"],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out
    assert Path(out.stdout.strip()).resolve() == (tmp_path / m.group(2)).resolve(), out.stdout


# ===========================================================================
# 16. small page fixes
# ===========================================================================

def test_login_page_after_logout_says_signed_out(authd):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])
    assert "signed out" not in d.request("GET", P + "/login").body.decode()
    for method in ("GET", "POST"):
        token = d.login("alice", "alice-pw-1")
        r = d.request(method, P + "/logout", headers={"Cookie": "authToken=" + token})
        assert r.status == 303, r
        page = d.request("GET", r.headers["location"])
        assert page.status == 200 and "You are signed out" in page.body.decode(), page
        assert is_login_page(page.body)


def test_rate_limit_page_keeps_the_user_name(authd):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")], env={"AUTH_LOGIN_RATE": "1/900"})
    r = d.request("POST", P + "/login", headers=FORM, body=form(username="alice", password="wrong-1"))
    assert r.status == 401 and 'value="alice"' in r.body.decode(), r
    r = d.request("POST", P + "/login", headers=FORM, body=form(username="alice", password="wrong-2"))
    assert r.status == 429 and r.headers.get("retry-after"), r
    assert 'value="alice"' in r.body.decode(), r.body


def test_who_am_i_page_links_back_to_the_site(authd):
    d = authd(users=["alice:" + fast_hash("alice-pw-1")])
    r = d.request("GET", P + "/", headers={"Cookie": "authToken=" + d.login("alice", "alice-pw-1")})
    assert r.status == 200 and b"alice" in r.body, r
    assert re.search(r'<a [^>]*href="/"', r.body.decode()), r.body
