"""Forward auth and single sign-on (issue 14, SPEC "Forward auth and single
sign-on").

1. Caddy: a real Caddy (Debian's package) runs Caddyfile.example, with only
   ports, file paths and upstream addresses substituted (each substitution
   must match exactly as often as expected, so the example cannot drift from
   what is tested), in front of a static tree and an app that echoes the
   headers it got; Chromium (Debian's, through Playwright) drives it.
2. Traefik: not packaged here, so contrib/traefik/authd.yml is checked at the
   protocol level: the test builds the requests Traefik's ForwardAuth sends
   with the file's settings (what Traefik's forward.go does, written out
   below) and applies its rules to authd's real answers.
3. Single sign-on: contrib/nginx/central-login.conf in a real nginx, three
   host names under example.com (Chromium's --host-resolver-rules send them
   to 127.0.0.1, so no name leaves this machine), AUTH_COOKIE_DOMAIN and
   AUTH_LOGIN_URL set.
4. Hostile: authd as a subprocess over plain HTTP: open redirects (absolute
   targets), header injection, forged X-Forwarded-* headers, and the statuses
   P/forward may answer.

Why example.com and not *.test for the single sign-on: Chromium refuses a
cookie with Domain=test (a single label counts as a public suffix), and takes
Domain=example.test or Domain=example.com; example.com keeps the configs as
shipped, and the resolver rule keeps every connection on loopback.

Forged X-Forwarded-* from a peer that is not loopback: every address this
machine may use here is loopback (127.0.0.0/8, ::1; a unix socket counts as
loopback too), so no real connection can come from an untrusted peer. Those
tests hand authd's request handler a Request with a public peer address,
exactly as the server fills it in, beside an end-to-end check that the same
headers from a loopback peer are honoured (so the unit test is not vacuous).

Tools: caddy, nginx, /usr/bin/chromium, playwright, openssl, PyYAML. Missing
tools skip locally and fail in CI (conftest.need). Screenshots of the
access-denied page land in test-artifacts/ (gitignored).
"""
import http.client
import importlib.util
import json
import os
import re
import socket
import ssl
import subprocess
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import conftest
from conftest import (ARTIFACTS, HERE, SECRET, Authd, EchoApp, Response, aged, auth_cookie, decode, echo_of,
                      fast_hash, free_port, local_nginx, need, need_browser, nginx_config_test, run_cli, send, signed_in_page,
                      start_nginx, stop_all, substitute, wait_serving)

CADDYFILE = HERE / "Caddyfile.example"
TRAEFIK = HERE / "contrib" / "traefik" / "authd.yml"
CENTRAL = HERE / "contrib" / "nginx" / "central-login.conf"
CADDY = "/usr/bin/caddy"
PREFIX = "/__auth"
BYPASS = "bypass-value-for-monitoring-0123456789"
PASSWORDS = {"alice": "alice-pw-1", "bob": "bob-pw-2", "carol": "carol-pw-3"}
USERS = [  # alice: admin; bob: staff; carol: no group
    "# forward-auth users",
    "alice:%s:admin" % fast_hash(PASSWORDS["alice"]),
    "bob:%s:staff" % fast_hash(PASSWORDS["bob"]),
    "carol:%s" % fast_hash(PASSWORDS["carol"]),
]
CSS = b"#marker { color: rgb(4, 5, 6); }\n"
STATIC_HTML = (b'<!doctype html><html><head><title>Static page</title>'
               b'<link rel="stylesheet" href="/static/site.css"></head>'
               b'<body><h1 id="marker">Static page</h1></body></html>\n')
FORGED = {"X-Auth-User": "mallory", "X-Auth-Admin": "true", "X-Auth-Groups": "admin,staff"}
IDENTITY = ("x-auth-user", "x-auth-groups", "x-auth-admin")
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


# ---------------------------------------------------------------------------
# tools, shared pieces
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caddy_tools():
    need(os.access(CADDY, os.X_OK), "%s is missing (Debian: apt-get install caddy)" % CADDY)
    need_browser()


def https_fetch(port, host, method, path, headers=None, body=None, cookie=None):
    """One HTTPS request to 127.0.0.1:PORT for HOST (SNI and Host), no
    redirects followed, certificate not checked (it is throw-away)."""
    headers = dict(headers or {})
    headers.setdefault("Host", "%s:%d" % (host, port))
    if cookie is not None:
        headers["Cookie"] = "authToken=" + cookie
    context = ssl._create_unverified_context()
    conn = http.client.HTTPSConnection(host, port, timeout=20, context=context)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname=host)
    return send(conn, method, path, headers, body)


def http_fetch(port, host, path, headers=None):
    return send(http.client.HTTPConnection("127.0.0.1", port, timeout=20), "GET", path,
                dict({"Host": "%s:%d" % (host, port)}, **(headers or {})))


def login_in_browser(page, name, password=None):
    conftest.login_in_browser(page, name, password or PASSWORDS[name])


def is_login_page(page):
    return page.get_by_label("User name").count() == 1 and page.get_by_label("Password").count() == 1


def login_url_parts(location):
    """(scheme://host:port/path of a Location, its rd parameter or None)."""
    parts = urllib.parse.urlsplit(location)
    rd = urllib.parse.parse_qs(parts.query).get("rd")
    return "%s://%s%s" % (parts.scheme, parts.netloc, parts.path), (rd[0] if rd else None)


def assert_denied_page(page_or_body, name):
    """authd's access-denied page: who is signed in, 'sign in as someone else', 'back'."""
    text = page_or_body if isinstance(page_or_body, str) else page_or_body.decode("utf-8", "replace")
    assert name in text, text[:2000]
    assert re.search(r"(?i)sign in as someone else", text), text[:2000]
    assert re.search(r"(?i)>\s*back", text), text[:2000]
    assert 'name="password"' not in text


def denied_in_browser(new_context, url):
    """A fresh browser that asked for URL and signed in there as bob, reloading it:
    authd's access-denied page, 403. (context, page, the reload's response)"""
    ctx, page = signed_in_page(new_context, url, "bob", PASSWORDS["bob"])
    response = page.reload()
    assert response.status == 403
    assert_denied_page(page.content(), "bob")
    return ctx, page, response


def sign_in_as_someone_else(ctx, page, login_url, url):
    """On the access-denied page, "sign in as someone else": signed out, asked to
    log in at LOGIN_URL, back at URL as alice."""
    page.get_by_role("link", name=re.compile("sign in as someone else", re.I)).click()
    page.wait_for_url(re.compile(re.escape(login_url) + r"\?"))
    assert auth_cookie(ctx) is None
    login_in_browser(page, "alice")
    page.wait_for_url(url)
    assert json.loads(page.locator("#echo").inner_text())["headers"]["x-auth-user"] == ["alice"]


# ===========================================================================
# 1. Caddy running Caddyfile.example
# ===========================================================================

def caddy_env(home):
    """Caddy keeps its state (autosave, certificates) in these: a temp dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "CADDY"))}
    env.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"))
    return env


def caddy_config(example, *, admin_port, http_port, https_port, authd_port, app_port, root, cert, key):
    """Caddyfile.example with ports, paths and upstream addresses made local.
    `default_bind 127.0.0.1` keeps Caddy's listeners on loopback: the same
    thing test_e2e does to nginx's `listen 80` (Caddy puts the address in a
    global option, not in the site's address)."""
    text = example
    text = substitute(text, "admin localhost:2019", "admin 127.0.0.1:%d" % admin_port)
    text = substitute(text, "http_port 80\n", "http_port %d\n\tdefault_bind 127.0.0.1\n" % http_port)
    text = substitute(text, "https_port 443\n", "https_port %d\n" % https_port)
    text = substitute(text, "/etc/letsencrypt/live/example.com/fullchain.pem", str(cert))
    text = substitute(text, "/etc/letsencrypt/live/example.com/privkey.pem", str(key))
    text = substitute(text, "root * /var/www/example", "root * %s" % root)
    text = substitute(text, "127.0.0.1:3003", "127.0.0.1:%d" % authd_port, count=3)
    text = substitute(text, "127.0.0.1:8080", "127.0.0.1:%d" % app_port)
    return text


class CaddySite:
    """authd + the echo app + Caddy running Caddyfile.example, all on loopback."""

    def __init__(self, workdir, cert, key, authd_env=None):
        self.workdir = workdir = Path(workdir)
        self.caddy = self.app = self.authd = None
        try:
            (workdir / "authd").mkdir(parents=True)
            env = {"AUTH_LOGIN_RATE": "1000/900", "AUTH_BYPASS": BYPASS}
            env.update(authd_env or {})
            self.authd = Authd(workdir / "authd", users=USERS, env=env)
            self.app = EchoApp()
            self.root = workdir / "www"
            (self.root / "static").mkdir(parents=True)
            (self.root / "static" / "site.css").write_bytes(CSS)
            (self.root / "static" / "page.html").write_bytes(STATIC_HTML)
            for attempt in range(3):  # a free port may be taken by someone else before Caddy binds it
                if self._start(workdir / ("caddy%d" % attempt), cert, key):
                    break
            else:
                raise RuntimeError("Caddy could not bind free ports:\n" + self.logs())
        except BaseException:
            self.stop()
            raise
        self.url = "https://example.com:%d" % self.https_port

    def _start(self, directory, cert, key):
        directory.mkdir()
        self.log_file = directory / "caddy.log"
        self.http_port, self.https_port, admin = free_port(), free_port(), free_port()
        config = caddy_config(CADDYFILE.read_text(), admin_port=admin, http_port=self.http_port,
                              https_port=self.https_port, authd_port=self.authd.port, app_port=self.app.port,
                              root=self.root, cert=cert, key=key)
        (directory / "Caddyfile").write_text(config)
        with open(self.log_file, "wb") as out:
            self.caddy = subprocess.Popen([CADDY, "run", "--config", str(directory / "Caddyfile"),
                                           "--adapter", "caddyfile"], stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, env=caddy_env(directory), cwd=str(directory))
        return wait_serving(self.caddy, lambda: "serving initial configuration" in self.logs(), self.https_port,
                            "address already in use", "Caddy", self.logs, timeout=20)

    def logs(self):
        text = self.log_file.read_text(errors="replace") if getattr(self, "log_file", None) else ""
        return "caddy log:\n%s\nauthd log:\n%s" % (text[-6000:], self.authd.log()[-4000:] if self.authd else "")

    def stop(self):
        stop_all(self.caddy, self.app, self.authd)

    def fetch(self, method, path, **kwargs):
        return https_fetch(self.https_port, "example.com", method, path, **kwargs)

    def login(self, name):
        r = self.fetch("POST", PREFIX + "/login", body={"username": name, "password": PASSWORDS[name]})
        assert r.status == 200 and r.json() == {"status": "ok", "user": name}, (r, self.logs())
        return r.cookie()


@pytest.fixture(scope="module")
def caddy_site(caddy_tools, cert, tmp_path_factory):
    s = CaddySite(tmp_path_factory.mktemp("caddy"), *cert)
    yield s
    s.stop()


def test_caddyfile_example_adapts_and_is_formatted(caddy_tools, tmp_path):
    """`caddy adapt` takes the example as shipped; `caddy fmt` would not change it."""
    env = caddy_env(tmp_path)
    r = subprocess.run([CADDY, "adapt", "--config", str(CADDYFILE), "--adapter", "caddyfile"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "not formatted" not in r.stderr, r.stderr
    config = json.loads(r.stdout)
    assert config["admin"]["listen"] == "localhost:2019"
    r = subprocess.run([CADDY, "fmt", str(CADDYFILE)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout == CADDYFILE.read_text(), r.stderr


def test_caddy_logged_out_browser_goes_to_login_and_back_to_the_exact_url(caddy_site, new_context):
    ctx = new_context()
    page = ctx.new_page()
    target = caddy_site.url + "/some/page?x=1&y=a%2Fb&z=%C3%A9"
    page.goto(target)
    # a real redirect: the address bar shows authd's login page, which knows the way back
    base, rd = login_url_parts(page.url)
    assert base == caddy_site.url + PREFIX + "/login"
    assert rd == target
    assert is_login_page(page)
    login_in_browser(page, "carol")
    page.wait_for_url(target)
    assert page.locator("h1").inner_text() == "App page /some/page?x=1&y=a%2Fb&z=%C3%A9"
    echo = json.loads(page.locator("#echo").inner_text())
    assert echo["headers"]["x-auth-user"] == ["carol"] and echo["method"] == "GET"
    # static files through the same check: the page, then its stylesheet
    page.goto(caddy_site.url + "/static/page.html")
    assert page.locator("#marker").evaluate("e => getComputedStyle(e).color") == "rgb(4, 5, 6)"


def test_caddy_login_redirect_status_and_target(caddy_site):
    """Without a browser in the way: the 302 itself, and a static file too."""
    for path in ("/some/page?x=1", "/static/page.html", "/"):
        r = caddy_site.fetch("GET", path, headers={"Accept": BROWSER_ACCEPT})
        assert r.status == 302, (path, r)
        base, rd = login_url_parts(r.headers["location"])
        assert base == caddy_site.url + PREFIX + "/login" and rd == caddy_site.url + path, r
        assert STATIC_HTML not in r.body and b"App page" not in r.body
    # a form posted by a logged-out browser: sent to log in, the app never sees the body
    before = len(caddy_site.app.requests)
    r = caddy_site.fetch("POST", "/form", body=b"a=1", headers={"Accept": BROWSER_ACCEPT,
                                                                "Content-Type": "application/x-www-form-urlencoded"})
    assert r.status == 302 and len(caddy_site.app.requests) == before


def test_caddy_identity_headers_reach_the_app_and_forged_ones_do_not(caddy_site):
    for name, groups, admin in (("alice", "admin", "true"), ("bob", "staff", "false"), ("carol", "", "false")):
        r = caddy_site.fetch("GET", "/whoami", cookie=caddy_site.login(name), headers=FORGED)
        assert r.status == 200, r
        h = echo_of(r.body)["headers"]
        assert h["x-auth-user"] == [name] and h["x-auth-groups"] == [groups] and h["x-auth-admin"] == [admin], h
    # the bypass (monitoring) is let through with no identity at all, and its secret stays with authd
    r = caddy_site.fetch("GET", "/monitor", headers=dict(FORGED, **{"X-Auth-Bypass": BYPASS}))
    assert r.status == 200, r
    h = echo_of(r.body)["headers"]
    for name in IDENTITY:
        assert h.get(name, [""]) in ([""], ["false"]), (name, h)
    assert "x-auth-bypass" not in h
    # forged headers without any session: nothing reaches the app
    before = len(caddy_site.app.requests)
    r = caddy_site.fetch("GET", "/whoami", headers=dict(FORGED, Accept=BROWSER_ACCEPT))
    assert r.status == 302 and len(caddy_site.app.requests) == before


def test_caddy_forwards_the_original_request_to_authd(caddy_site):
    """What Caddy asks authd carries the page's method, host, path and query;
    forged X-Forwarded-* from the client do not change where the login sends
    the browser back to."""
    forged = {"Accept": BROWSER_ACCEPT, "X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http",
              "X-Forwarded-Uri": "/elsewhere", "X-Forwarded-Method": "DELETE", "X-Original-Host": "evil.example"}
    r = caddy_site.fetch("GET", "/deep/path?q=%20x", headers=forged)
    assert r.status == 302, r
    base, rd = login_url_parts(r.headers["location"])
    assert base == caddy_site.url + PREFIX + "/login" and rd == caddy_site.url + "/deep/path?q=%20x"
    assert "evil" not in r.headers["location"]


def test_caddy_non_browser_clients_get_401(caddy_site):
    for headers in ({"Accept": "application/json"}, {}, {"Accept": "image/avif,image/webp,*/*"},
                    {"Accept": BROWSER_ACCEPT, "Authorization": "Bearer not-a-token"}):
        r = caddy_site.fetch("GET", "/api/thing", headers=headers)
        assert r.status == 401, (headers, r)
        assert "location" not in r.headers
        assert r.headers.get("www-authenticate", "").startswith("Basic realm="), r
        assert r.headers["content-type"].startswith("application/json"), r
        json.loads(r.body)


def test_caddy_non_admin_gets_the_styled_403_page(caddy_site, new_context):
    ARTIFACTS.mkdir(exist_ok=True)
    ctx, page, response = denied_in_browser(new_context, caddy_site.url + "/admin/settings?tab=2")
    assert "text/html" in response.headers["content-type"]
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    # the house style: authd's own stylesheet applies (the card of the login page)
    assert page.locator("main").evaluate("e => getComputedStyle(e).borderTopStyle") == "solid"
    page.screenshot(path=str(ARTIFACTS / "forbidden-caddy.png"))
    sign_in_as_someone_else(ctx, page, caddy_site.url + PREFIX + "/login", caddy_site.url + "/admin/settings?tab=2")


def test_caddy_403_without_browser(caddy_site):
    for name in ("bob", "carol"):
        r = caddy_site.fetch("GET", "/admin/x", cookie=caddy_site.login(name), headers={"Accept": BROWSER_ACCEPT})
        assert r.status == 403, r
        assert_denied_page(r.body, name)
    r = caddy_site.fetch("GET", "/admin/x", cookie=caddy_site.login("alice"))
    assert r.status == 200 and echo_of(r.body)["headers"]["x-auth-admin"] == ["true"]


def test_caddy_logout(caddy_site, new_context):
    ctx, page = signed_in_page(new_context, caddy_site.url + "/a", "carol", PASSWORDS["carol"])
    page.goto(caddy_site.url + PREFIX + "/")
    assert "carol" in page.locator("main").inner_text()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(re.escape(caddy_site.url + PREFIX + "/login")))
    assert auth_cookie(ctx) is None
    page.goto(caddy_site.url + "/a")
    assert is_login_page(page) and "App page" not in page.content()


def test_caddy_refreshed_cookie_reaches_the_browser(caddy_site, new_context):
    ctx = new_context()
    old = aged(caddy_site.login("carol"))
    ctx.add_cookies([{"name": "authToken", "value": old, "url": caddy_site.url, "httpOnly": True, "secure": True}])
    page = ctx.new_page()
    page.goto(caddy_site.url + "/refresh-me")
    assert json.loads(page.locator("#echo").inner_text())["headers"]["x-auth-user"] == ["carol"]
    new = auth_cookie(ctx)["value"]
    assert new != old and decode(new)["iat"] >= decode(old)["iat"] + 300 - 5
    assert decode(new)["sub"] == "carol"
    # on a static file too, and never a stray Set-Cookie when there is nothing to refresh
    r = caddy_site.fetch("GET", "/static/site.css", cookie=aged(new))
    assert r.status == 200 and r.body == CSS and r.cookie(), r
    r = caddy_site.fetch("GET", "/static/site.css", cookie=new)
    assert r.status == 200 and r.header_values("set-cookie") == [], r


def test_caddy_questions_are_not_pages_and_pages_are_public(caddy_site):
    token = caddy_site.login("alice")
    for path in (PREFIX + "/forward", PREFIX + "/auth", PREFIX + "/admin", PREFIX + "/forward?group=x"):
        assert caddy_site.fetch("GET", path, cookie=token).status == 404, path
    assert caddy_site.fetch("GET", PREFIX + "/healthz").body == b"ok\n"
    r = caddy_site.fetch("GET", PREFIX + "/login")
    assert r.status == 200 and b'name="password"' in r.body


def test_caddy_plain_http_redirects_to_https(caddy_site):
    r = http_fetch(caddy_site.http_port, "example.com", "/x?y=1")
    assert r.status in (301, 308), r
    # Caddy's own redirect names https's usual port (443): right for the site, not for this test's port
    assert r.headers["location"] in ("https://example.com/x?y=1", caddy_site.url + "/x?y=1"), r


def test_caddy_logged_no_errors(caddy_site):
    """Runs after the Caddy tests above: nothing made Caddy log an error
    (a 502 from a dead or confused upstream would) or authd hit a bug."""
    text = caddy_site.logs()
    # "context canceled": the browser dropped a request it no longer wanted (a
    # favicon or a page left mid-load when the test moved on), not a fault
    errors = [line for line in text.splitlines() if '"level":"error"' in line and "context canceled" not in line]
    assert errors == [], "\n".join(errors)
    assert "internal error" not in caddy_site.authd.log() and "Traceback" not in caddy_site.authd.log()


# ===========================================================================
# 2. Traefik: contrib/traefik/authd.yml at the protocol level
# ===========================================================================

HOP_HEADERS = ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade")


def traefik_config():
    need(importlib.util.find_spec("yaml") is not None, "PyYAML is missing (pip install -r requirements-test.txt)")
    import yaml
    return yaml.safe_load(TRAEFIK.read_text())["http"]


def traefik_router(config, host, path):
    """The router Traefik picks: the highest priority whose Host and
    PathPrefix rules match (the only two kinds the example uses)."""
    best = None
    for name, router in config["routers"].items():
        rules = re.findall(r"(Host|PathPrefix)\(`([^`]*)`\)", router["rule"])
        assert " && ".join("%s(`%s`)" % r for r in rules) == router["rule"], router["rule"]
        if all(host == v if kind == "Host" else path.startswith(v) for kind, v in rules):
            if best is None or router["priority"] > best[1]["priority"]:
                best = (name, router)
    return best


def traefik_chain(config, host, path, client_headers):
    """(service, forwardAuth settings or None, request headers the service
    gets before forwardAuth's copy) for a request, through the router's
    middlewares as written (headers middlewares: an empty value removes)."""
    name, router = traefik_router(config, host, path)
    headers = {k.lower(): v for k, v in client_headers.items()}
    forward = None
    for middleware in router.get("middlewares", []):
        spec = config["middlewares"][middleware]
        if "forwardAuth" in spec:
            assert forward is None, "one forwardAuth per router"
            forward = spec["forwardAuth"]
        for key, value in spec.get("headers", {}).get("customRequestHeaders", {}).items():
            if forward is None or key.lower() != "x-auth-bypass":
                if value == "":
                    headers.pop(key.lower(), None)
                else:
                    headers[key.lower()] = value
    return router["service"], forward, headers


def traefik_ask(authd_port, forward, method, scheme, host, uri, client_ip, headers):
    """The request Traefik's ForwardAuth sends (forward.go, writeHeader, with
    trustForwardHeader false): GET to the address, the client's headers less
    hop-by-hop ones, X-Forwarded-* from the request itself."""
    address = urllib.parse.urlsplit(forward["address"])
    assert address.netloc == "127.0.0.1:3003", forward["address"]
    assert forward.get("trustForwardHeader") is False
    ask = {k: v for k, v in headers.items() if k not in HOP_HEADERS}
    allowed = forward.get("authRequestHeaders")
    if allowed:
        ask = {k: v for k, v in ask.items() if k in {a.lower() for a in allowed}}
    ask.update({"x-forwarded-for": client_ip, "x-forwarded-method": method, "x-forwarded-proto": scheme,
                "x-forwarded-host": host, "x-forwarded-uri": uri, "host": "127.0.0.1:%d" % authd_port})
    conn = http.client.HTTPConnection("127.0.0.1", authd_port, timeout=20)
    try:
        conn.request("GET", address.path + ("?" + address.query if address.query else ""), headers=ask)
        resp = conn.getresponse()
        return Response(resp.status, resp.getheaders(), resp.read())
    finally:
        conn.close()


def traefik_request(authd, path, headers=None, method="GET", host="example.com"):
    """A client request through the example's routers to authd. Returns
    ('client', Response) when Traefik answers the client with authd's
    response, or ('app', request headers the app gets, cookies added to the
    app's response)."""
    config = traefik_config()
    service, forward, app_headers = traefik_chain(config, host, path, dict(headers or {}))
    if forward is None:
        return "pages", service, app_headers
    r = traefik_ask(authd.port, forward, method, "https", host, path, "198.51.100.20",
                    {k.lower(): v for k, v in (headers or {}).items()})
    if not 200 <= r.status < 300:
        return "client", r
    for name in forward.get("authResponseHeaders", []):
        app_headers.pop(name.lower(), None)
        if r.header_values(name):
            app_headers[name.lower()] = ",".join(r.header_values(name))
    cookies = [v for v in r.header_values("set-cookie")
               if v.split("=", 1)[0].strip() in forward.get("addAuthCookiesToResponse", [])]
    final = {k: v for k, v in app_headers.items()}
    for key, value in config["middlewares"]["no-bypass-header"]["headers"]["customRequestHeaders"].items():
        final.pop(key.lower(), None)
    return "app", final, cookies


@pytest.fixture(scope="module")
def traefik_authd(tmp_path_factory):
    traefik_config()
    server = Authd(tmp_path_factory.mktemp("traefik"), users=USERS,
                   env={"AUTH_LOGIN_RATE": "1000/900", "AUTH_BYPASS": BYPASS})
    yield server
    server.stop()


def test_traefik_example_wiring():
    """Every router but authd's pages goes through a forwardAuth to
    P/forward that trusts no client X-Forwarded-*, copies the three identity
    headers and the refreshed cookie; the pages router wins on /__auth/."""
    config = traefik_config()
    assert traefik_router(config, "example.com", "/__auth/login")[0] == "authd-pages"
    assert traefik_router(config, "example.com", "/admin/x")[0] == "admin"
    assert traefik_router(config, "example.com", "/x")[0] == "site"
    assert traefik_router(config, "other.example", "/x") is None
    for name, router in config["routers"].items():
        middlewares = router.get("middlewares", [])
        assert middlewares[0] == "client-headers", name
        forwards = [m for m in middlewares if "forwardAuth" in config["middlewares"][m]]
        if name == "authd-pages":
            assert forwards == [] and router["service"] == "authd"
            continue
        assert len(forwards) == 1 and middlewares.index("no-bypass-header") > middlewares.index(forwards[0])
        spec = config["middlewares"][forwards[0]]["forwardAuth"]
        assert urllib.parse.urlsplit(spec["address"]).path == PREFIX + "/forward"
        assert spec["trustForwardHeader"] is False
        assert [h.lower() for h in spec["authResponseHeaders"]] == list(IDENTITY)
        assert spec["addAuthCookiesToResponse"] == ["authToken"]
    assert config["services"]["authd"]["loadBalancer"]["servers"] == [{"url": "http://127.0.0.1:3003"}]


def test_traefik_logged_out_browser_is_sent_to_login_and_back(traefik_authd):
    kind, r = traefik_request(traefik_authd, "/docs/page?x=1&y=2", headers={"Accept": BROWSER_ACCEPT})
    assert kind == "client" and r.status == 302, r
    base, rd = login_url_parts(r.headers["location"])
    assert base == "https://example.com" + PREFIX + "/login"
    assert rd == "https://example.com/docs/page?x=1&y=2"
    # the login page (through the pages router) takes it back there
    token = traefik_authd.login("carol", PASSWORDS["carol"])
    r = traefik_authd.request("GET", PREFIX + "/login?" + urllib.parse.urlencode({"rd": rd}),
                              headers={"Host": "example.com", "Cookie": "authToken=" + token})
    assert r.status == 303 and r.headers["location"] == "https://example.com/docs/page?x=1&y=2", r


def test_traefik_signed_in_user_reaches_the_app_with_identity_only_from_authd(traefik_authd):
    token = traefik_authd.login("bob", PASSWORDS["bob"])
    result = traefik_request(traefik_authd, "/x", headers=dict(FORGED, Cookie="authToken=" + token))
    assert result[0] == "app", result
    kind, headers, cookies = result
    assert (headers["x-auth-user"], headers["x-auth-groups"], headers["x-auth-admin"]) == ("bob", "staff", "false")
    assert cookies == []  # a fresh token is not re-issued
    kind, headers, cookies = traefik_request(traefik_authd, "/x", headers={"Cookie": "authToken=" + aged(token)})
    assert kind == "app" and headers["x-auth-user"] == "bob"
    assert len(cookies) == 1 and decode(cookies[0].split("=", 1)[1].split(";", 1)[0])["sub"] == "bob"
    # the bypass: allowed, no identity, and the secret does not reach the app
    kind, headers, cookies = traefik_request(traefik_authd, "/x", headers=dict(FORGED, **{"X-Auth-Bypass": BYPASS}))
    assert kind == "app"
    assert all(headers.get(name, "") in ("", "false") for name in IDENTITY), headers
    assert "x-auth-bypass" not in headers


def test_traefik_admin_router_forbids_non_admins_with_the_page(traefik_authd):
    kind, r = traefik_request(traefik_authd, "/admin/x", headers={
        "Cookie": "authToken=" + traefik_authd.login("bob", PASSWORDS["bob"]), "Accept": BROWSER_ACCEPT})
    assert kind == "client" and r.status == 403 and r.headers["content-type"].startswith("text/html")
    assert_denied_page(r.body, "bob")
    result = traefik_request(traefik_authd, "/admin/x", headers={
        "Cookie": "authToken=" + traefik_authd.login("alice", PASSWORDS["alice"])})
    assert result[0] == "app" and result[1]["x-auth-admin"] == "true", result


def test_traefik_scripts_get_401(traefik_authd):
    for headers in ({"Accept": "application/json"}, {}, {"Accept": BROWSER_ACCEPT, "Authorization": "Bearer x"}):
        kind, r = traefik_request(traefik_authd, "/api", headers=headers)
        assert kind == "client" and r.status == 401 and "location" not in r.headers, (headers, r)


def test_traefik_pages_router_strips_client_claims(traefik_authd):
    kind, service, headers = traefik_request(traefik_authd, PREFIX + "/login", headers={
        "X-Original-Remote-Addr": "203.0.113.1", "X-Original-Host": "evil.example", "X-Original-URI": "//evil"})
    assert kind == "pages" and service == "authd"
    assert not {"x-original-remote-addr", "x-original-host", "x-original-uri"} & set(headers)


# ===========================================================================
# 3. Single sign-on: contrib/nginx/central-login.conf in a real nginx
# ===========================================================================

def central_config(example, *, http_port, https_port, authd_port, app_port, wiki_port, cert, key):
    text = local_nginx(example, http_port=http_port, https_port=https_port, authd_port=authd_port,
                       app_port=app_port, cert=cert, key=key, tls_servers=2)
    text = substitute(text, "server 127.0.0.1:8081;", "server 127.0.0.1:%d;" % wiki_port)
    text = substitute(text, "return 302 https://auth.example.com/", "return 302 https://auth.example.com:%d/" % https_port)
    text = substitute(text, "return 302 https://auth.example.com$", "return 302 https://auth.example.com:%d$" % https_port)
    return text


class SsoSite:
    """authd (AUTH_COOKIE_DOMAIN=example.com, AUTH_LOGIN_URL on auth.example.com)
    + two echo apps + nginx running central-login.conf."""

    def __init__(self, workdir, cert, key):
        self.nginx = self.authd = self.error_log = None
        self.app, self.wiki = EchoApp("App"), EchoApp("Wiki")
        try:
            self.nginx, directory, (self.http_port, self.https_port) = start_nginx(
                Path(workdir), lambda directory, http_port, https_port: self._site(directory, http_port, https_port,
                                                                                  cert, key), logs=self.logs)
        except BaseException:
            self.stop()
            raise
        self.error_log = directory / "error.log"
        self.auth_url, self.app_url, self.wiki_url = ("https://%s.example.com:%d" % (name, self.https_port)
                                                      for name in ("auth", "app", "wiki"))

    def _site(self, directory, http_port, https_port, cert, key):
        """A fresh authd for this try (its login URL names the port), and the site for nginx."""
        if self.authd is not None:
            self.authd.stop()
        (directory / "authd").mkdir()
        self.authd = Authd(directory / "authd", users=USERS, env={
            "AUTH_LOGIN_RATE": "1000/900", "AUTH_COOKIE_DOMAIN": "example.com",
            "AUTH_LOGIN_URL": "https://auth.example.com:%d%s/login" % (https_port, PREFIX)})
        return central_config(CENTRAL.read_text(), http_port=http_port, https_port=https_port,
                              authd_port=self.authd.port, app_port=self.app.port, wiki_port=self.wiki.port,
                              cert=cert, key=key)

    def logs(self):
        return "authd log:\n%s" % (self.authd.log()[-4000:] if self.authd else "")

    def stop(self):
        stop_all(self.nginx, self.app, self.wiki, self.authd)

    def fetch(self, name, method, path, **kwargs):
        return https_fetch(self.https_port, name + ".example.com", method, path, **kwargs)


@pytest.fixture(scope="module")
def sso(nginx_tools, cert, tmp_path_factory):
    s = SsoSite(tmp_path_factory.mktemp("sso"), *cert)
    yield s
    s.stop()


def test_central_login_config_passes_nginx_t(nginx_tools, cert, tmp_path):
    site = central_config(CENTRAL.read_text(), http_port=free_port(), https_port=free_port(), authd_port=3003,
                          app_port=8080, wiki_port=8081, cert=cert[0], key=cert[1])
    r = nginx_config_test(tmp_path, site)
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr


def test_sso_signing_in_on_one_site_signs_in_on_the_other(sso, new_context):
    ctx = new_context()
    page = ctx.new_page()
    target = sso.app_url + "/page?x=1&y=a%2Fb"
    page.goto(target)
    assert page.url.startswith(sso.auth_url + PREFIX + "/login?"), page.url  # the central login page
    assert is_login_page(page)
    login_in_browser(page, "bob")
    page.wait_for_url(target)                                                  # back where we started
    echo = json.loads(page.locator("#echo").inner_text())
    assert page.locator("h1").inner_text() == "App page /page?x=1&y=a%2Fb"
    assert echo["headers"]["x-auth-user"] == ["bob"] and echo["headers"]["host"] == ["app.example.com"]
    cookie = auth_cookie(ctx)
    assert cookie["domain"] == ".example.com" and cookie["secure"] and cookie["httpOnly"]
    # the other site: signed in already, no login page on the way
    page.goto(sso.wiki_url + "/wiki/Home")
    assert page.url == sso.wiki_url + "/wiki/Home"
    assert page.locator("h1").inner_text() == "Wiki page /wiki/Home"
    assert json.loads(page.locator("#echo").inner_text())["headers"]["x-auth-user"] == ["bob"]
    # and the sign-in site says who it is
    page.goto(sso.auth_url + "/")
    assert "bob" in page.locator("main").inner_text()


def test_sso_signing_out_on_one_site_signs_out_on_both(sso, new_context):
    ctx, page = signed_in_page(new_context, sso.wiki_url + "/w", "carol", PASSWORDS["carol"])
    page.goto(sso.app_url + "/a")
    assert json.loads(page.locator("#echo").inner_text())["headers"]["x-auth-user"] == ["carol"]
    page.goto(sso.app_url + PREFIX + "/logout")           # a "Sign out" link on one site
    page.wait_for_url(re.compile(re.escape(sso.auth_url + PREFIX + "/login")))
    assert auth_cookie(ctx) is None

    def pages_served():  # not the favicon, which Chromium may fetch late, while still signed in
        return [r["path"] for r in sso.app.requests + sso.wiki.requests if r["path"] != "/favicon.ico"]
    seen = pages_served()
    for url in (sso.app_url + "/a", sso.wiki_url + "/w"):
        page.goto(url)
        assert page.url.startswith(sso.auth_url + PREFIX + "/login?") and is_login_page(page), url
    assert pages_served() == seen  # neither site let the browser in


def test_sso_forbidden_page_and_sign_in_as_someone_else(sso, new_context):
    ctx, page, _ = denied_in_browser(new_context, sso.app_url + "/admin/panel?x=1")
    page.screenshot(path=str(ARTIFACTS / "forbidden-central-login.png"))
    sign_in_as_someone_else(ctx, page, sso.auth_url + PREFIX + "/login", sso.app_url + "/admin/panel?x=1")


def test_sso_login_refuses_to_send_people_off_the_domain(sso):
    token = sso.fetch("auth", "POST", PREFIX + "/login", body={"username": "bob", "password": PASSWORDS["bob"]}).cookie()
    assert token
    for rd, expected in (("https://wiki.example.com/x?y=1", "https://wiki.example.com/x?y=1"),
                         ("https://evil.example.net/", "/"), ("https://example.com.evil.net/", "/")):
        r = sso.fetch("auth", "GET", PREFIX + "/login?" + urllib.parse.urlencode({"rd": rd}), cookie=token)
        assert r.status == 303 and r.headers["location"] == expected, (rd, r)


@pytest.fixture(scope="module")
def nginx_site(nginx_tools, cert, tmp_path_factory):
    """nginx.example.conf as test_e2e runs it (its Site), for the 403 page."""
    from test_e2e import Site
    s = Site(tmp_path_factory.mktemp("nginx403") / "site", *cert)
    yield s
    s.stop()


def test_nginx_example_shows_the_forbidden_page(nginx_site, new_context):
    """`error_page 403 = /__auth/forbidden` in nginx.example.conf: the page,
    status 403, and "sign in as someone else" coming back to the page."""
    for name, path in (("bob", "/admin/x"), ("carol", "/staff/"), ("alice", "/staff/")):
        r = nginx_site.fetch("GET", path, token=nginx_site.login(name))
        assert r.status == 403 and r.headers["content-type"].startswith("text/html"), (name, r)
        assert_denied_page(r.body, name)
    ctx, page, _ = denied_in_browser(new_context, nginx_site.url + "/admin/x?y=1")
    sign_in_as_someone_else(ctx, page, nginx_site.url + PREFIX + "/login", nginx_site.url + "/admin/x?y=1")


def test_sso_nginx_logged_no_errors(sso):
    errors = [line for line in sso.error_log.read_text(errors="replace").splitlines()
              if re.search(r"\[(error|crit|alert|emerg)\]", line)]
    assert errors == [], "\n".join(errors)
    assert "internal error" not in sso.authd.log() and "Traceback" not in sso.authd.log()


# ===========================================================================
# 4. Hostile: authd as a subprocess, plain HTTP
# ===========================================================================

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])
SITE = "app.example.com"


@pytest.fixture(scope="module")
def fsrv(tmp_path_factory):
    """authd with one login shared by example.com and its subdomains."""
    server = Authd(tmp_path_factory.mktemp("fsrv"), users=USERS, env={
        "AUTH_LOGIN_RATE": "1000000/60", "AUTH_COOKIE_DOMAIN": "example.com", "AUTH_BYPASS": BYPASS})
    yield server
    server.stop()
    log = server.log()
    assert "internal error" not in log and "connection error" not in log and "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def ftoken(fsrv):
    return fsrv.login("bob", PASSWORDS["bob"])


def forward(server, uri="/page?x=1", host=SITE, proto="https", token=None, headers=None, query=""):
    """GET P/forward as Caddy asks it (Host and X-Forwarded-Host: the site)."""
    h = {"Host": host, "X-Forwarded-Host": host, "X-Forwarded-Proto": proto, "X-Forwarded-Uri": uri,
         "X-Forwarded-Method": "GET", "X-Forwarded-For": "198.51.100.7", "Accept": BROWSER_ACCEPT}
    if token:
        h["Cookie"] = "authToken=" + token
    h.update(headers or {})
    return server.request("GET", PREFIX + "/forward" + ("?" + query if query else ""), headers=h)


def return_after_login(server, token, rd, host=SITE):
    """Where authd sends a signed-in browser for return target RD: by the
    login page (GET, already signed in) and by the login form (POST)."""
    page = server.request("GET", PREFIX + "/login?" + urllib.parse.urlencode({"rd": rd}),
                          headers={"Host": host, "Cookie": "authToken=" + token})
    form = server.request("POST", PREFIX + "/login", headers={
        "Host": host, "Content-Type": "application/x-www-form-urlencoded", "Origin": "https://" + host},
        body=urllib.parse.urlencode({"username": "bob", "password": PASSWORDS["bob"], "rd": rd}).encode())
    for r in (page, form):
        assert r.status == 303, (rd, r)
        assert re.fullmatch(r"[\x21-\x7e]+", r.headers["location"]), r.headers["location"]
    return page.headers["location"], form.headers["location"]


# Absolute return targets that must fall back to "/" with AUTH_COOKIE_DOMAIN=example.com,
# the site app.example.com, and a Secure cookie.
OFF_SITE = [
    "https://evil.com/", "https://evil.com", "http://evil.com/", "//evil.com/", "///evil.com/", "////evil.com",
    "https:evil.com", "https:/evil.com", "https:///evil.com/", "https:\\\\evil.com/", "https:/\\evil.com/",
    "https:\\/evil.com/", "\\\\evil.com", "/\\evil.com", "/\t/evil.com", " https://evil.com/",
    # userinfo: the host is what follows "@"; any userinfo is refused
    "https://example.com@evil.com/", "https://app.example.com@evil.com/", "https://app.example.com:443@evil.com/",
    "https://user:pw@app.example.com/", "https://app.example.com%40evil.com/", "https://app.example.com\\@evil.com/",
    "https://evil.com\\@app.example.com/", "https://evil.com\\.example.com/", "https://evil.com/\\@app.example.com",
    # look-alike and suffix tricks
    "https://example.com.evil.com/", "https://app.example.com.evil.com/", "https://evilexample.com/",
    "https://notexample.com/", "https://example.co/", "https://example.com-evil.com/", "https://com/",
    "https://example.com%2eevil.com/", "https://app.example.com%2Eevil.com/", "https://evil%2ecom/",
    "https://%65vil.com/", "https://app.example.com%2f@evil.com/", "https://app%2eexample.com/",
    # trailing and empty labels
    "https://app.example.com./", "https://example.com../", "https://.example.com/", "https://app..example.com/",
    # ports
    "https://app.example.com:99999/", "https://app.example.com:abc/", "https://app.example.com:-1/",
    "https://app.example.com:443:443/", "https://evil.com:443/", "https://evil.com:443.example.com/",
    "https://example.com:443.evil.com/", "https://app.example.com:0x1bb/",
    # IDNA: look-alikes that are other names, and separators that become dots
    "https://ex\u0430mple.com/", "https://app.ex\u0430mple.com/", "https://app.example.com\u3002evil.com/",
    "https://app.example\uff0ecom.evil.com/", "https://app.example.com\uff61evil.com/",
    "https://evil.com\uff0fexample.com/", "https://exam\u00adple.com.evil.com/", "https://app.example.com\u2044evil.com/",
    "https://xn--e1awd7f.com/", "https://app.example.c\u00f6m/",
    # other schemes, scripts, addresses, control characters
    "javascript:alert(1)", "JavaScript://app.example.com/%0aalert(1)", "data:text/html,<script>x</script>",
    "ftp://app.example.com/", "wss://app.example.com/", "file:///etc/passwd", "https://127.0.0.1/",
    "https://[::1]/", "https://2130706433/", "https://0x7f.1/", "https://app.example.com/\r\nSet-Cookie: x=1",
    "https://app.\texample.com/", "https://app.example.com\n/", "https://app.example.com/\x00",
    "https://app.example.com /", "https://" + "a." * 130 + "example.com/",
    # http while the cookie is Secure: the browser would drop the session there
    "http://app.example.com/", "HTTP://app.example.com/",
]
ON_SITE = [  # (target, where a browser must be sent)
    ("https://app.example.com/x?y=1&z=%2F2", "https://app.example.com/x?y=1&z=%2F2"),
    ("https://example.com/", "https://example.com/"),
    ("https://wiki.example.com:8443/p", "https://wiki.example.com:8443/p"),
    ("https://deep.sub.example.com/a", "https://deep.sub.example.com/a"),
    ("HTTPS://APP.Example.COM/Path", "https://app.example.com/Path"),
    ("https://b\u00fccher.example.com/", "https://xn--bcher-kva.example.com/"),
    ("https://app.example.com/caf\u00e9", "https://app.example.com/caf%C3%A9"),
    ("/local/path?q=1", "/local/path?q=1"),
]


@pytest.mark.parametrize("rd", OFF_SITE)
def test_open_redirect_absolute_targets_fall_back_to_root(fsrv, ftoken, rd):
    assert return_after_login(fsrv, ftoken, rd) == ("/", "/")


@pytest.mark.parametrize("rd, expected", ON_SITE)
def test_absolute_targets_within_the_cookie_domain_are_followed(fsrv, ftoken, rd, expected):
    assert return_after_login(fsrv, ftoken, rd) == (expected, expected)


def test_without_cookie_domain_only_the_site_itself_is_a_target(authd):
    a = authd(users=USERS)
    token = a.login("bob", PASSWORDS["bob"])
    assert return_after_login(a, token, "https://app.example.com/x", host="app.example.com") == \
        ("https://app.example.com/x", "https://app.example.com/x")
    assert return_after_login(a, token, "https://app.example.com:8443/x", host="app.example.com:8443") == \
        ("https://app.example.com:8443/x", "https://app.example.com:8443/x")
    for rd in ("https://wiki.example.com/x", "https://example.com/", "https://evil.com/"):
        assert return_after_login(a, token, rd, host="app.example.com") == ("/", "/"), rd


def test_http_targets_only_when_the_cookie_is_not_secure(authd):
    a = authd(users=USERS, env={"AUTH_COOKIE_SECURE": "false", "AUTH_COOKIE_DOMAIN": "example.com"})
    token = a.login("bob", PASSWORDS["bob"])
    assert return_after_login(a, token, "http://wiki.example.com/x") == ("http://wiki.example.com/x",) * 2
    assert return_after_login(a, token, "https://wiki.example.com/x") == ("https://wiki.example.com/x",) * 2
    assert return_after_login(a, token, "http://evil.com/") == ("/", "/")


def lands_within_domain(location):
    """What a browser does with LOCATION: stays on this site (a path) or goes
    to https://example.com or a name under it, with no userinfo."""
    if location.startswith("/"):
        joined = urllib.parse.urlsplit(urllib.parse.urljoin("https://app.example.com/p", location.replace("\\", "/")))
    else:
        joined = urllib.parse.urlsplit(location.replace("\\", "/"))
    host = joined.hostname or ""
    return joined.scheme == "https" and "@" not in joined.netloc and \
        (host == "example.com" or host.endswith(".example.com")) and "%" not in joined.netloc


@FUZZ
@given(st.one_of(
    st.text(alphabet="/\\:.@%?#a \t\u3002\uff0e\uff0f\u00adexample.comvil", max_size=40).map(lambda s: "https://" + s),
    st.text(alphabet="/\\:.@%?#aexample.comvil", max_size=30).map(lambda s: "https://app.example.com" + s),
    st.text(max_size=60)))
@example("https://app.example.com\\@evil.com")
@example("https://app.example.com#@evil.com")
@example("https://app.example.com?@evil.com")
def test_fuzz_return_target_stays_within_the_domain(fsrv, ftoken, rd):
    if "\x00" in rd or len(rd) > 1000:
        return
    page, form = return_after_login(fsrv, ftoken, rd)
    for location in (page, form):
        assert lands_within_domain(location), (rd, location)


CRLF = ["%0d%0aSet-Cookie:%20evil=1", "%0aX-Injected:%201", "\u2028X-Injected: 1", "\u0085X-Injected: 1",
        "%E2%80%A8X-Injected:%201", "\u010d\u010aX-Injected: 1", "%00"]


@pytest.mark.parametrize("bad", CRLF)
def test_forward_redirect_never_carries_a_header_injection(fsrv, bad):
    from conftest import Raw
    for name, value in (("X-Forwarded-Uri", "/p" + bad), ("X-Forwarded-Host", SITE + bad),
                        ("X-Forwarded-Proto", "https" + bad)):
        head = ("GET %s/forward HTTP/1.1\r\nHost: %s\r\nAccept: text/html\r\nX-Forwarded-Host: %s\r\n"
                "X-Forwarded-Proto: https\r\nX-Forwarded-Uri: /p\r\n" % (PREFIX, SITE, SITE))
        head = re.sub(r"(?m)^%s: .*\r\n" % name, "", head) + "%s: %s\r\nConnection: close\r\n\r\n" % (name, value)
        c = Raw(fsrv.port)
        try:
            c.send(head.encode("utf-8"))
            r = c.response()  # Raw checks that every header line is a well-formed field
        finally:
            c.close()
        assert r.status in (302, 401, 403), (name, value, r)
        assert "x-injected" not in r.headers, r.all
        assert not any(k.lower() == "set-cookie" and "evil" in v for k, v in r.all), r.all
        for _, v in r.all:
            assert re.fullmatch(r"[\x20-\x7e]*", v), v
        # the whole login page reached by that Location stays free of it too
        if r.status == 302:
            loc = urllib.parse.urlsplit(r.headers["location"])
            page = fsrv.request("GET", loc.path + "?" + loc.query, headers={"Host": SITE})
            assert page.status == 200 and b"X-Injected: 1\n" not in page.body


@FUZZ
@given(method=st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND"]),
       query=st.sampled_from(["", "group=admin", "group=staff", "user=bob", "nonsense=1", "group=", "x", "%ff",
                              "group=admin&user=carol", "rd=https://evil.com/"]),
       headers=st.dictionaries(
           st.sampled_from(["X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Uri", "X-Forwarded-Method",
                            "X-Forwarded-For", "Accept", "Authorization", "Cookie", "X-Auth-Bypass", "Origin",
                            "Sec-Fetch-Mode", "X-Original-URI", "Host"]),
           st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xff, blacklist_characters="\x7f"),
                   max_size=60) | st.sampled_from(["text/html", "https", "http", "//evil.com", "evil.com:99999",
                                                   "authToken=x.y.z", "[::1]", "Basic Ym9iOmJvYi1wdy0y"])),
       who=st.sampled_from([None, "valid", "aged", "bad"]))
def test_fuzz_forward_answers_only_2xx_302_401_403(fsrv, ftoken, method, query, headers, who):
    from conftest import Raw
    lines = ["%s %s/forward%s HTTP/1.1" % (method, PREFIX, "?" + query if query else "")]
    headers = dict(headers)
    headers.setdefault("Host", SITE)
    if who:
        cookie = {"valid": ftoken, "aged": aged(ftoken), "bad": ftoken[:-3] + "abc"}[who]
        headers["Cookie"] = "authToken=" + cookie
    lines += ["%s: %s" % (k, v.strip(" \t")) for k, v in headers.items()]
    c = Raw(fsrv.port)
    try:
        c.send(("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1"))
        r = c.response(head_only=method == "HEAD")
    finally:
        c.close()
    assert r is not None
    assert 200 <= r.status < 300 or r.status in (302, 401, 403), (lines, r)
    if r.status == 302:
        assert re.fullmatch(r"[\x21-\x7e]+", r.headers["location"]), r.headers["location"]


def test_forward_answers(fsrv, ftoken):
    """The four answers, each with what goes with it."""
    # allowed: identity headers; a fresh token is not re-issued, an aged one is
    r = forward(fsrv, token=ftoken)
    assert r.status == 200 and r.body == b"", r
    assert (r.headers["x-auth-user"], r.headers["x-auth-groups"], r.headers["x-auth-admin"]) == ("bob", "staff", "false")
    assert r.header_values("set-cookie") == []
    r = forward(fsrv, token=aged(ftoken))
    assert r.status == 200 and decode(r.cookie())["sub"] == "bob" and "Domain=example.com" in r.headers["set-cookie"]
    # signed in, not allowed by the rule: the page, status 403
    r = forward(fsrv, token=ftoken, query="group=admin")
    assert r.status == 403 and r.headers["content-type"].startswith("text/html"), r
    assert_denied_page(r.body, "bob")
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    for query in ("group=staff", "user=bob", "group=admin&user=bob", "group=admin,staff"):
        assert forward(fsrv, token=ftoken, query=query).status == 200, query
    assert forward(fsrv, token=ftoken, query="nonsense=1").status == 403  # a typo in a config fails closed
    # a logged-out browser: to the login page on the site's own host, with the full URL to come back to
    r = forward(fsrv, uri="/p/q?x=1&y=%2F")
    assert r.status == 302, r
    base, rd = login_url_parts(r.headers["location"])
    assert base == "https://app.example.com" + PREFIX + "/login" and rd == "https://app.example.com/p/q?x=1&y=%2F"
    r = forward(fsrv, uri="/", host="wiki.example.com:8443", proto="http")
    assert login_url_parts(r.headers["location"]) == ("http://wiki.example.com:8443" + PREFIX + "/login",
                                                      "http://wiki.example.com:8443/")
    # a bad cookie is cleared on the way to the login
    r = forward(fsrv, token="garbage")
    assert r.status == 302 and r.cookie() == "" and "Max-Age=0" in r.headers["set-cookie"]
    # scripts and API clients: 401, no redirect
    for headers in ({"Accept": "application/json"}, {"Accept": ""}, {"Authorization": "Bearer nope"}):
        r = forward(fsrv, headers=headers)
        assert r.status == 401 and "location" not in r.headers, (headers, r)
        assert r.headers["www-authenticate"].startswith("Basic realm="), r
    # a browser's own fetch or image: 401 too, but no Basic challenge (no password dialog)
    for mode, accept in (("cors", "*/*"), ("no-cors", "image/avif,image/webp,*/*")):
        r = forward(fsrv, headers={"Accept": accept, "Sec-Fetch-Mode": mode})
        assert r.status == 401 and "www-authenticate" not in r.headers and "location" not in r.headers, r
    # the bypass: allowed, no identity
    r = forward(fsrv, headers={"X-Auth-Bypass": BYPASS})
    assert r.status == 200 and r.headers.get("x-auth-user", "") == ""
    r = forward(fsrv, headers={"X-Auth-Bypass": BYPASS + "x"})
    assert r.status == 302


def test_forward_with_a_central_login_url(authd):
    a = authd(users=USERS, env={"AUTH_COOKIE_DOMAIN": "example.com",
                                "AUTH_LOGIN_URL": "https://auth.example.com/__auth/login"})
    r = forward(a, uri="/x?y=1&z=2", host="wiki.example.com")
    assert r.status == 302
    assert login_url_parts(r.headers["location"]) == ("https://auth.example.com/__auth/login",
                                                      "https://wiki.example.com/x?y=1&z=2")
    # the login page there takes the browser back, even with the URL unencoded as nginx's
    # `return 302 ...?rd=$scheme://$http_host$request_uri` writes it
    token = a.login("bob", PASSWORDS["bob"])
    for query in ("rd=" + urllib.parse.quote("https://wiki.example.com/x?y=1&z=2", safe=""),
                  "rd=https://wiki.example.com/x?y=1&z=2"):
        r = a.request("GET", PREFIX + "/login?" + query,
                      headers={"Host": "auth.example.com", "Cookie": "authToken=" + token})
        assert r.status == 303 and r.headers["location"] == "https://wiki.example.com/x?y=1&z=2", (query, r)
    # and the login form carries it
    r = a.request("GET", PREFIX + "/login?rd=https://wiki.example.com/x?y=1&z=2", headers={"Host": "auth.example.com"})
    assert r.status == 200 and 'name="rd" value="https://wiki.example.com/x?y=1&amp;z=2"' in r.body.decode()


@pytest.mark.parametrize("value", ["auth.example.com/__auth/login", "ftp://auth.example.com/", "https://",
                                   "https://user@auth.example.com/__auth/login", "https://auth.example.com/x#f",
                                   "javascript:alert(1)", "https://auth.example.com/ login", "/__auth/login",
                                   "https://exa mple.com/"])
def test_auth_login_url_must_be_an_absolute_http_url(tmp_path, value):
    users = tmp_path / "users.txt"
    users.write_text(USERS[1] + "\n")
    r = run_cli("check", "--users", users, env={"AUTH_TOKEN_SECRET": SECRET, "AUTH_LOGIN_URL": value})
    assert r.returncode != 0 and "AUTH_LOGIN_URL" in r.stderr and "Traceback" not in r.stderr, (value, r.stderr)


def test_auth_login_url_accepts_https_and_http_urls(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text(USERS[1] + "\n")
    for value in ("https://auth.example.com/__auth/login", "http://127.0.0.1:3003/__auth/login",
                  "https://auth.example.com:8443/login?site=1"):
        r = run_cli("check", "--users", users, env={"AUTH_TOKEN_SECRET": SECRET, "AUTH_LOGIN_URL": value})
        assert r.returncode == 0, (value, r.stderr)


def test_cross_site_login_allows_hosts_within_the_cookie_domain(fsrv):
    def post(origin, site="auth.example.com", fetch_site=None):
        h = {"Host": site, "X-Original-Host": site, "Origin": origin}
        if fetch_site:
            h["Sec-Fetch-Site"] = fetch_site
        return fsrv.request("POST", PREFIX + "/login", headers=h,
                            body={"username": "bob", "password": PASSWORDS["bob"]})
    for origin in ("https://auth.example.com", "https://app.example.com", "https://example.com",
                   "https://wiki.example.com:8443"):
        assert post(origin, fetch_site="same-site").status == 200, origin
    for origin in ("https://evil.com", "https://example.com.evil.com", "https://notexample.com", "null",
                   "https://app.example.com@evil.com"):
        r = post(origin)
        assert r.status == 403 and r.cookie() is None, (origin, r)
    assert post("https://app.example.com", fetch_site="cross-site").status == 403


def test_forbidden_page(fsrv, ftoken):
    r = fsrv.request("GET", PREFIX + "/forbidden", headers={"Host": SITE, "Cookie": "authToken=" + ftoken,
                                                            "X-Original-URI": "/staff/x?y=1"})
    assert r.status == 403 and r.headers["content-type"].startswith("text/html")
    assert_denied_page(r.body, "bob")
    assert "content-security-policy" in r.headers and r.headers["cache-control"] == "no-store"
    # "sign in as someone else": signs out, then asks for a login that comes back here
    m = re.search(r'<a[^>]*href="([^"]+)"[^>]*>\s*Sign in as someone else', r.body.decode(), re.I)
    assert m, r.body
    import html
    link = urllib.parse.urlsplit(html.unescape(m.group(1)))
    assert link.path == PREFIX + "/logout"
    out = fsrv.request("GET", PREFIX + "/logout?" + link.query, headers={"Host": SITE, "Cookie": "authToken=" + ftoken})
    assert out.status == 303 and out.cookie() == ""
    base, rd = login_url_parts(out.headers["location"])
    assert base.endswith(PREFIX + "/login") and rd in ("/staff/x?y=1", "https://app.example.com/staff/x?y=1")
    # "Back": where the user came from, if that may be a return target and is not this page
    def back(referer):
        r = fsrv.request("GET", PREFIX + "/forbidden", headers={
            "Host": SITE, "Cookie": "authToken=" + ftoken, "X-Original-URI": "/staff/x?y=1", "Referer": referer})
        m = re.search(r'<a href="([^"]*)">Back</a>', r.body.decode())
        assert r.status == 403 and m, r.body
        return html.unescape(m.group(1))
    assert back("https://app.example.com/home?a=1") == "https://app.example.com/home?a=1"
    assert back("https://wiki.example.com/w") == "https://wiki.example.com/w"
    for referer in ("https://evil.com/", "https://app.example.com/staff/x?y=1", "javascript:alert(1)",
                    "https://app.example.com" + PREFIX + "/login?rd=%2Fstaff%2Fx"):
        assert back(referer) == "/", referer
    # nobody signed in: still 403 (nginx keeps the status), with a way to sign in; the
    # address it came from is only ever shown escaped
    r = fsrv.request("GET", PREFIX + "/forbidden", headers={"Host": SITE, "X-Original-URI": '/x?"><script>y'})
    assert r.status == 403 and re.search(rb"(?i)sign in", r.body)
    assert b"<script" not in r.body and b'"><script' not in r.body


def test_forwarded_headers_from_a_peer_that_is_not_loopback_are_ignored(tmp_path):
    """No real connection can come from a non-loopback peer here (see the
    module docstring): the handler gets the Request the server would build."""
    from test_hostile import make_app
    import authd as A
    app = make_app(tmp_path / "users.txt", {"AUTH_COOKIE_DOMAIN": "example.com"})
    forged = {"host": SITE, "accept": BROWSER_ACCEPT, "x-forwarded-host": "evil.example",
              "x-forwarded-proto": "http", "x-forwarded-uri": "//evil.example/x", "x-forwarded-method": "GET"}
    for peer, trusted in (("203.0.113.9", False), ("2001:db8::1", False), ("10.0.0.1", False),
                          ("::ffff:10.0.0.1", False), ("127.0.0.1", True), ("::1", True), ("", True)):
        reply = call_app(A, app, peer, forged)
        assert reply.status == 302, (peer, reply.status)
        location = dict(reply.headers)["Location"]
        assert ("evil.example" in location) == trusted, (peer, location)


def call_app(A, app, peer, headers, path=PREFIX + "/forward", query=""):
    request = A.Request()
    request.method, request.path, request.query = "GET", path, query
    request.target = path + ("?" + query if query else "")
    request.version, request.headers, request.body = b"HTTP/1.1", dict(headers), b""
    request.peer, request.keep_alive = peer, True
    return app.dispatch(request)


public_ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).filter(
    lambda ip: not ip.is_loopback and not (ip.version == 6 and ip.ipv4_mapped and ip.ipv4_mapped.is_loopback))


@FUZZ
@given(peer=public_ips, host=st.sampled_from(["evil.example", "app.example.com.evil.example", "evil.example:443"]),
       proto=st.sampled_from(["http", "https", "javascript"]), uri=st.sampled_from(["/", "//evil.example/", "/x"]))
def test_fuzz_untrusted_peer_cannot_steer_the_login_redirect(tmp_path_factory, peer, host, proto, uri):
    from test_hostile import make_app
    import authd as A
    app = fuzz_app(tmp_path_factory, make_app)
    reply = call_app(A, app, str(peer), {"host": SITE, "accept": BROWSER_ACCEPT, "x-forwarded-host": host,
                                         "x-forwarded-proto": proto, "x-forwarded-uri": uri})
    assert reply.status == 302
    assert "evil" not in dict(reply.headers)["Location"]


_FUZZ_APP = []


def fuzz_app(tmp_path_factory, make_app):
    if not _FUZZ_APP:
        _FUZZ_APP.append(make_app(tmp_path_factory.mktemp("fuzzapp") / "users.txt", {"AUTH_COOKIE_DOMAIN": "example.com"}))
    return _FUZZ_APP[0]


def test_forwarded_headers_from_loopback_are_honoured_end_to_end(fsrv):
    """The positive control of the test above, over a real connection: from a
    loopback peer (a proxy on this host) X-Forwarded-* say where to come back."""
    r = forward(fsrv, uri="/from/proxy?a=b", host="wiki.example.com")
    assert login_url_parts(r.headers["location"])[1] == "https://wiki.example.com/from/proxy?a=b"
