"""Two-factor sign-in (issue 12): the users file, the command line, the second
login step (JSON and form), hostile pending values, the rate limits, required
groups, P/totp, and the whole thing in Chromium through the real nginx.

authd runs as a subprocess; codes come from pyotp (test-only); the QR codes
are read by zxing-cpp from the terminal output and from browser screenshots.
"""
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import pytest

from conftest import (ARTIFACTS, AUTHD, SECRET, auth_cookie, decode as claims_of, fast_hash, login_in_browser,
                      run_cli, wait_until, write_users)
import authd as authd_py
from test_totp_qr import decode, image, png_grey, terminal_pixels

P = "/__auth"
PASSWORD = {"tina": "tina-pw-1", "bob": "bob-pw-2", "adam": "adam-pw-3", "tom": "tom-pw-4"}
TINA_SECRET = authd_py.new_totp_secret()  # tina has two-factor; bob has not; adam is an admin without it
TOM_SECRET = authd_py.new_totp_secret()
HASHES = {name: fast_hash(pw) for name, pw in PASSWORD.items()}
USERS = ["# two-factor tests",
         "tina:%s:staff:%s" % (HASHES["tina"], TINA_SECRET),
         "bob:%s:staff" % HASHES["bob"],
         "adam:%s:admin" % HASHES["adam"],
         "tom:%s::%s" % (HASHES["tom"], TOM_SECRET)]
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def away_from_step_edge():
    """Wait (on the clock, with a deadline) until at least 5 s remain in this
    30-second step, so "the current step" means the same in test and server."""
    deadline = time.monotonic() + 10
    while time.time() % 30 > 25 and time.monotonic() < deadline:
        time.sleep(0.1)


def code(pyotp, secret, steps=0):
    return pyotp.TOTP(secret).at(time.time() + 30 * steps)


def form(fields):
    import urllib.parse
    return urllib.parse.urlencode(fields).encode()


def pending_of(body):
    m = re.search(rb'name="pending" value="([^"]+)"', body)
    assert m, body[:2000]
    return m.group(1).decode()


def shown_secret(body):
    m = re.search(rb'<p class="secret">([A-Z2-7 ]+)</p>', body)
    assert m, body[:3000]
    return m.group(1).decode().replace(" ", "")


def mint_step(**claims):
    """A pending step signed as authd signs them (the test knows the secret)."""
    now = int(time.time())
    base = {"sub": "tina", "pwh": authd_py.parse_user_line(USERS[1]).fingerprint, "auth_time": now,
            "exp": now + 300, "jti": "test-" + os.urandom(6).hex(), "step": "code"}
    base.update(claims)
    return authd_py.sign_token(base, authd_py.step_key(SECRET.encode()))


def post_code(d, pending, code_value, rd="/next", headers=None):
    return d.request("POST", P + "/login/code", headers=dict(FORM, **(headers or {})),
                     body=form({"pending": pending, "code": code_value, "rd": rd}))


def form_login(d, name, rd="/next"):
    r = d.request("POST", P + "/login", headers=FORM,
                  body=form({"username": name, "password": PASSWORD[name], "rd": rd}))
    assert r.status == 200 and r.cookie() is None, r
    return r


# ---------------------------------------------------------------------------
# users file
# ---------------------------------------------------------------------------

def test_users_file_fourth_field():
    tina = authd_py.parse_user_line(USERS[1])
    assert (tina.groups, tina.totp, tina.amr) == (("staff",), TINA_SECRET, ("pwd", "otp"))
    tom = authd_py.parse_user_line(USERS[4])
    assert (tom.groups, tom.totp) == ((), TOM_SECRET)
    assert tom.line() == USERS[4] and tina.line() == USERS[1]
    bob = authd_py.parse_user_line(USERS[2])
    assert bob.totp is None and bob.line() == USERS[2] and bob.amr == ("pwd",)
    assert authd_py.parse_user_line("bob:%s:staff:" % HASHES["bob"]).totp is None  # an empty 4th field: none
    # the fingerprint covers the secret: a change of either ends sessions; without one it is as before
    assert tina.fingerprint != authd_py.User("tina", HASHES["tina"], ["staff"], TOM_SECRET).fingerprint
    import base64
    import hashlib
    assert bob.fingerprint == base64.urlsafe_b64encode(hashlib.sha256(HASHES["bob"].encode()).digest()[:9]).decode()
    for bad in ("tina:%s:staff:NOT-BASE32!" % HASHES["tina"], "tina:%s::JBSWY3DP" % HASHES["tina"],
                "tina:%s:staff:%s:extra" % (HASHES["tina"], TINA_SECRET)):
        with pytest.raises(ValueError):
            authd_py.parse_user_line(bad)


def test_check_names_a_bad_secret(tmp_path):
    write_users(tmp_path / "users.txt", ["bob:%s:staff:0000" % HASHES["bob"]])
    cp = run_cli("check", "--users", tmp_path / "users.txt", "--env", "/dev/null")
    assert cp.returncode == 1 and "line 1" in cp.stderr and "two-factor secret" in cp.stderr, cp


def test_passwd_keeps_the_secret(tmp_path):
    path = write_users(tmp_path / "users.txt", USERS)
    cp = run_cli("passwd", "tina", "--users", path, "--env", "/dev/null", input="new-password\n")
    assert cp.returncode == 0, cp
    tina = [line for line in path.read_text().splitlines() if line.startswith("tina:")][0]
    assert tina.endswith(":staff:" + TINA_SECRET) and HASHES["tina"] not in tina


# ---------------------------------------------------------------------------
# command line: totp NAME, --remove, adduser --totp, users
# ---------------------------------------------------------------------------

def enrol_by_cli(pyotp, zxing, args, first_input="", wrong_codes=0):
    """Run an enrolling command, read its QR code off the terminal output with
    a real decoder, answer with a pyotp code (after WRONG_CODES wrong ones)."""
    p = subprocess.Popen([sys.executable, str(AUTHD)] + [str(a) for a in args], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")
    try:
        p.stdin.write(first_input)
        p.stdin.flush()
        out = read_until(p, "Code shown by the app: ")
        qr_text = out[:out.index("Scan the QR code")]
        found = decode(zxing, image(terminal_pixels(qr_text, "dark"), 3))
        assert len(found) == 1, out
        uri = found[0][0]
        assert "  URI: %s\n" % uri in out  # the printed URI is the one in the QR code
        key = re.search(r"  key: ([A-Z2-7 ]+)\n", out).group(1).replace(" ", "")
        otp = pyotp.parse_uri(uri)
        assert otp.secret == key
        for _ in range(wrong_codes):
            p.stdin.write("%06d\n" % ((int(otp.now()) + 500000) % 10 ** 6))
            p.stdin.flush()
            out += read_until(p, "Code shown by the app: ")
        p.stdin.write(otp.now() + "\n")
        p.stdin.flush()
        rest, err = p.communicate(timeout=60)
        return p.returncode, out + rest, err, uri, key
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def read_until(p, marker, timeout=60):
    out, deadline = "", time.monotonic() + timeout
    while not out.endswith(marker):
        assert time.monotonic() < deadline, out
        ch = p.stdout.read(1)
        assert ch, "the command ended early:\n%s\n%s" % (out, p.stderr.read())
        out += ch
    return out


def test_cli_totp_enrols_after_one_code_and_removes(pyotp, zxing, tmp_path, authd):
    d = authd(users=USERS)
    path = d.users_file
    token = d.login("bob", PASSWORD["bob"])
    assert d.auth(token).status == 200
    rc, out, err, uri, key = enrol_by_cli(pyotp, zxing, ["totp", "bob", "--users", path, "--env", d.env_file,
                                                         "--issuer", "Example Intranet"],
                                          wrong_codes=1)
    assert rc == 0, (out, err)
    assert "That code does not match" in out
    parsed = pyotp.parse_uri(uri)
    assert (parsed.name, parsed.issuer) == ("bob", "Example Intranet")
    assert "bob:%s:staff:%s" % (HASHES["bob"], key) in path.read_text().splitlines()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key not in err and key not in d.log()  # the secret is never logged
    assert run_cli("users", "--users", path, "--env", "/dev/null").stdout.splitlines()[:3] == [
        "tina\tstaff\ttwo-factor", "bob\tstaff\ttwo-factor", "adam\tadmin"]
    wait_until(lambda: d.auth(token).status == 401, 15)  # the running server picks the change up: bob's session ends
    r = d.request("POST", P + "/login", body={"username": "bob", "password": PASSWORD["bob"]})
    assert r.status == 401 and r.json()["totp"] is True
    cp = run_cli("totp", "bob", "--remove", "--users", path, "--env", "/dev/null")
    assert cp.returncode == 0 and "removed" in cp.stdout, cp
    assert "bob:%s:staff" % HASHES["bob"] in path.read_text().splitlines()


def test_cli_totp_without_a_right_code_changes_nothing(pyotp, tmp_path):
    path = write_users(tmp_path / "users.txt", USERS)
    before = path.read_bytes()
    cp = run_cli("totp", "bob", "--users", path, "--env", "/dev/null", input="000000\n111111\n222222\n")
    assert cp.returncode == 1 and "not changed" in cp.stderr, cp
    assert path.read_bytes() == before
    cp = run_cli("totp", "nobody", "--users", path, "--env", "/dev/null", input="")
    assert cp.returncode == 1 and "no user" in cp.stderr


def test_adduser_totp(pyotp, zxing, tmp_path):
    path = tmp_path / "users.txt"
    rc, out, err, uri, key = enrol_by_cli(pyotp, zxing, ["adduser", "zoë", "--totp", "--users", path,
                                                         "--env", "/dev/null"], first_input="zoe-password\n")
    assert rc == 0, (out, err)
    line = path.read_text().splitlines()[-1]
    assert line.startswith("zoë:$scrypt$") and line.endswith("::" + key)
    assert pyotp.parse_uri(uri).name == "zoë" and pyotp.parse_uri(uri).issuer == "authd"
    rc, out, err, uri, key = enrol_by_cli(pyotp, zxing, ["adduser", "ops", "--admin", "--totp", "--users", path,
                                                         "--env", "/dev/null"], first_input="ops-password\n")
    assert rc == 0 and path.read_text().splitlines()[-1].endswith(":admin:" + key)


# ---------------------------------------------------------------------------
# JSON login
# ---------------------------------------------------------------------------

def test_json_login_needs_the_code(pyotp, authd):
    d = authd(users=USERS)
    r = d.request("POST", P + "/login", body={"username": "tina", "password": PASSWORD["tina"]})
    assert (r.status, r.json(), r.cookie()) == (401, {"status": "fail", "message": "Code required", "totp": True}, None)
    r = d.request("POST", P + "/login", body={"username": "tina", "password": "wrong", "code": code(pyotp, TINA_SECRET)})
    assert r.status == 401 and r.json() == {"status": "fail", "message": "Invalid credentials"}  # no two-factor hint
    away_from_step_edge()
    for bad in (code(pyotp, TINA_SECRET, -2), code(pyotp, TINA_SECRET, 2), code(pyotp, TOM_SECRET),
                int(code(pyotp, TINA_SECRET)), "", None):
        if bad in (code(pyotp, TINA_SECRET, s) for s in (-1, 0, 1)):
            continue  # a far code can equal a near one by chance
        r = d.request("POST", P + "/login", body={"username": "tina", "password": PASSWORD["tina"], "code": bad})
        assert r.status == 401 and r.cookie() is None, (bad, r)
        assert r.json()["totp"] is True
    r = d.request("POST", P + "/login", body={"username": "tina", "password": PASSWORD["tina"],
                                              "code": code(pyotp, TINA_SECRET)})
    assert r.status == 200 and r.json() == {"status": "ok", "user": "tina"}, r
    claims = claims_of(r.cookie())
    assert claims["amr"] == ["pwd", "otp"]
    allowed = d.auth(r.cookie())
    assert allowed.status == 200 and allowed.headers["x-auth-amr"] == "pwd,otp"
    assert allowed.headers["x-auth-user"] == "tina"
    bob = d.auth(d.login("bob", PASSWORD["bob"]))
    assert bob.headers["x-auth-amr"] == "pwd" and claims_of(d.login("bob", PASSWORD["bob"]))["amr"] == ["pwd"]


def test_codes_accepted_at_neighbour_steps_and_never_twice(pyotp, authd):
    d = authd(users=USERS)
    away_from_step_edge()

    def login(c):
        return d.request("POST", P + "/login", body={"username": "tina", "password": PASSWORD["tina"], "code": c})

    previous, current, following = (code(pyotp, TINA_SECRET, s) for s in (-1, 0, 1))
    assert login(previous).status == 200
    assert login(previous).status == 401                       # replay
    if current != previous:
        assert login(current).status == 200
        assert login(current).status == 401                    # replay
    if following not in (previous, current):
        assert login(following).status == 200
        assert login(previous).status == 401                   # older than one already used
    assert "login failed from 127.0.0.1 user=\"tina\" (wrong two-factor code)" in d.log()
    assert TINA_SECRET not in d.log()


# ---------------------------------------------------------------------------
# form login: the code page
# ---------------------------------------------------------------------------

def test_form_login_asks_the_code_then_returns_to_the_target(pyotp, authd):
    d = authd(users=USERS)
    r = form_login(d, "tina", rd="/wiki/page?x=1")
    body = r.body.decode()
    assert 'action="%s/login/code"' % P in body and 'name="rd" value="/wiki/page?x=1"' in body
    assert 'name="password"' not in body and 'autocomplete="one-time-code"' in body
    assert "content-security-policy" in r.headers
    pending = pending_of(r.body)
    away_from_step_edge()
    wrong = post_code(d, pending, "%06d" % ((int(code(pyotp, TINA_SECRET)) + 1) % 10 ** 6), rd="/wiki/page?x=1")
    assert wrong.status == 401 and wrong.cookie() is None
    assert pending_of(wrong.body) == pending and 'role="alert"' in wrong.body.decode()  # the step is kept
    ok = post_code(d, pending, code(pyotp, TINA_SECRET), rd="/wiki/page?x=1")
    assert ok.status == 303 and ok.headers["location"] == "/wiki/page?x=1", ok
    assert d.auth(ok.cookie()).status == 200 and claims_of(ok.cookie())["amr"] == ["pwd", "otp"]
    # the code page for tom (no groups) too, with a spaced code
    pending = pending_of(form_login(d, "tom").body)
    c = code(pyotp, TOM_SECRET)
    assert post_code(d, pending, c[:3] + " " + c[3:]).status == 303


def test_bob_without_two_factor_signs_in_as_before(authd):
    d = authd(users=USERS)
    r = d.request("POST", P + "/login", headers=FORM, body=form({"username": "bob", "password": PASSWORD["bob"],
                                                                  "rd": "/x"}))
    assert r.status == 303 and r.headers["location"] == "/x" and r.cookie()


# ---------------------------------------------------------------------------
# hostile pending values, and no way around the second step
# ---------------------------------------------------------------------------

def test_hostile_pending_values_are_refused(pyotp, authd):
    d = authd(users=USERS)
    real = pending_of(form_login(d, "tina").body)
    header, payload, signature = real.split(".")
    tom = authd_py.parse_user_line(USERS[4])
    tampered_payload = authd_py.b64url_encode(json.dumps(dict(
        json.loads(authd_py.b64url_decode(payload)), sub="tom", pwh=tom.fingerprint)).encode())
    session_token = d.login("bob", PASSWORD["bob"])
    cases = {
        "other user's claims, tina's signature": header + "." + tampered_payload + "." + signature,
        "flipped signature": real[:-2] + ("A" if real[-2] != "A" else "B") + real[-1],
        "expired": mint_step(exp=int(time.time()) - 1),
        "expiry too far out": mint_step(exp=int(time.time()) + 3600),
        "old fingerprint": mint_step(pwh=authd_py.User("tina", fast_hash("x"), [], TINA_SECRET).fingerprint),
        "another user with tina's fingerprint": mint_step(sub="tom"),
        "a user without two-factor": mint_step(sub="bob", pwh=authd_py.parse_user_line(USERS[2]).fingerprint),
        "signed with the session key": authd_py.sign_token(json.loads(authd_py.b64url_decode(payload)), SECRET.encode()),
        "a session token": session_token,
        "an enrolment step from P/totp": mint_step(step="add", secret=TINA_SECRET),
        "unknown step kind": mint_step(step="done"),
        "empty": "",
        "garbage": "a.b.c",
    }
    away_from_step_edge()
    for name, value in cases.items():
        for c in (code(pyotp, TINA_SECRET), code(pyotp, TOM_SECRET)):
            r = post_code(d, value, c)
            assert r.status in (400, 401) and r.cookie() is None, (name, r)
    assert d.auth(None).status == 401
    # a pending value is no session cookie either
    assert d.auth(real).status == 401 and d.auth(real, P + "/").status == 303
    # and the real one still works (nothing above used up its tries: they were refused before counting)
    assert post_code(d, real, code(pyotp, TINA_SECRET)).status == 303


def test_pending_value_replayed_after_success_is_refused(pyotp, authd):
    d = authd(users=USERS)
    pending = pending_of(form_login(d, "tina").body)
    away_from_step_edge()
    assert post_code(d, pending, code(pyotp, TINA_SECRET)).status == 303
    again = post_code(d, pending, code(pyotp, TINA_SECRET, 1))  # a fresh, valid code: still refused
    assert again.status == 401 and again.cookie() is None and b"sign in again" in again.body


def test_at_most_five_codes_per_pending_step(pyotp, authd):
    d = authd(users=USERS)
    pending = pending_of(form_login(d, "tina").body)
    away_from_step_edge()
    good = code(pyotp, TINA_SECRET)
    wrong = "%06d" % ((int(good) + 7) % 10 ** 6)
    for _ in range(5):
        r = post_code(d, pending, wrong)
        assert r.status == 401 and pending_of(r.body) == pending
    r = post_code(d, pending, good)
    assert r.status == 401 and r.cookie() is None and b"Too many codes" in r.body
    # a new password step gives a new pending step
    assert post_code(d, pending_of(form_login(d, "tina").body), good).status == 303


def test_second_step_cannot_be_skipped(pyotp, authd):
    d = authd(users=USERS)
    away_from_step_edge()
    c = code(pyotp, TINA_SECRET)
    attempts = [
        ("POST", P + "/login", {"Content-Type": "application/json"},
         json.dumps({"username": "tina", "password": PASSWORD["tina"]}).encode()),
        ("POST", P + "/login", FORM, form({"username": "tina", "password": PASSWORD["tina"]})),
        ("POST", P + "/login", FORM, form({"username": "tina", "password": PASSWORD["tina"], "code": c})),
        ("POST", P + "/login", FORM, form({"username": "tina", "code": c})),
        ("POST", P + "/login", {"Content-Type": "application/json"}, json.dumps({"username": "tina", "code": c}).encode()),
        ("POST", P + "/login/code", FORM, form({"code": c})),
        ("POST", P + "/login/code", FORM, form({"username": "tina", "password": PASSWORD["tina"], "code": c})),
        ("POST", P + "/login/code", {"Content-Type": "application/json"},
         json.dumps({"username": "tina", "password": PASSWORD["tina"], "code": c}).encode()),
        ("GET", P + "/login/code?code=%s" % c, {}, None),
        ("POST", P + "/totp", FORM, form({"code": c})),
    ]
    for method, path, headers, body in attempts:
        r = d.request(method, path, headers=headers, body=body)
        assert r.cookie() is None or r.cookie() == "", (path, body, r)
        assert r.status in (200, 303, 400, 401, 415), r
    # and the code above is still unused: the legitimate two steps work with it
    pending = pending_of(form_login(d, "tina").body)
    assert post_code(d, pending, c).status == 303


def test_changed_password_voids_the_pending_step(pyotp, authd):
    d = authd(users=USERS)
    pending = pending_of(form_login(d, "tina").body)
    loads = d.log().count("loaded 4 user(s)")
    cp = run_cli("passwd", "tina", "--users", d.users_file, "--env", d.env_file, input="new-password\n")
    assert cp.returncode == 0
    wait_until(lambda: d.log().count("loaded 4 user(s)") > loads, 15)  # the server has read the new line
    r = post_code(d, pending, code(pyotp, TINA_SECRET))
    assert r.status == 401 and b"expired" in r.body and r.cookie() is None


def test_code_guesses_count_against_the_login_rate_limit(pyotp, authd):
    d = authd(users=USERS, env={"AUTH_LOGIN_RATE": "3/900"})
    pending = pending_of(form_login(d, "tina").body)  # a right password is refunded, as before
    away_from_step_edge()
    wrong = "%06d" % ((int(code(pyotp, TINA_SECRET)) + 3) % 10 ** 6)
    for _ in range(2):
        assert post_code(d, pending, wrong).status == 401
    pending = pending_of(form_login(d, "tina").body)
    assert post_code(d, pending, wrong).status == 401
    r = post_code(d, pending, code(pyotp, TINA_SECRET))
    assert r.status == 429 and int(r.headers["retry-after"]) > 0 and r.cookie() is None
    r = d.request("POST", P + "/login", body={"username": "tina", "password": PASSWORD["tina"],
                                              "code": code(pyotp, TINA_SECRET)})
    assert r.status == 429  # JSON codes count too


# ---------------------------------------------------------------------------
# AUTH_TOTP_GROUPS
# ---------------------------------------------------------------------------

def test_required_group_member_is_led_through_enrolment(pyotp, authd):
    d = authd(users=USERS)
    old_session = d.login("adam", PASSWORD["adam"])
    assert d.auth(old_session).status == 200
    d.env_file.write_text("AUTH_TOTP_GROUPS=admin\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("reloaded settings")
    assert d.auth(old_session).status == 401  # a session without the factor the group needs ends
    r = d.request("POST", P + "/login", body={"username": "adam", "password": PASSWORD["adam"]})
    assert r.status == 401 and r.json()["totp"] is True and r.json()["enrol"] is True and r.cookie() is None
    page = form_login(d, "adam", rd="/admin/")
    assert b"<svg" in page.body and b"Set up two-factor sign-in" in page.body
    secret = shown_secret(page.body)
    pending = pending_of(page.body)
    assert post_code(d, pending, code(pyotp, TINA_SECRET)).status == 401  # someone else's code
    assert "adam:%s:admin" % HASHES["adam"] in d.users_file.read_text().splitlines()  # nothing saved yet
    away_from_step_edge()
    r = post_code(d, pending, code(pyotp, secret), rd="/admin/")
    assert r.status == 303 and r.headers["location"] == "/admin/" and r.cookie(), r
    assert "adam:%s:admin:%s" % (HASHES["adam"], secret) in d.users_file.read_text().splitlines()
    allowed = d.auth(r.cookie(), P + "/admin")
    assert allowed.status == 200 and allowed.headers["x-auth-amr"] == "pwd,otp"
    # from now on adam signs in with a code
    r = d.request("POST", P + "/login", body={"username": "adam", "password": PASSWORD["adam"]})
    assert r.json()["message"] == "Code required"
    # bob is not in the group: unchanged
    assert d.auth(d.login("bob", PASSWORD["bob"])).status == 200


# ---------------------------------------------------------------------------
# P/totp: enrolment and removal in the browser's session
# ---------------------------------------------------------------------------

def session_cookie(token):
    return {"Cookie": "authToken=" + token}


def test_totp_page_enrols_and_removes_and_ends_other_sessions(pyotp, authd):
    d = authd(users=USERS)
    mine, other = d.login("bob", PASSWORD["bob"]), d.login("bob", PASSWORD["bob"])
    who = d.auth(mine, P + "/").body.decode()
    assert 'href="%s/totp"' % P in who and "set up" in who
    r = d.request("GET", P + "/totp", headers=session_cookie(mine))
    assert r.status == 200 and b"<svg" in r.body and b"<script" not in r.body
    secret, pending = shown_secret(r.body), pending_of(r.body)
    away_from_step_edge()
    post = dict(session_cookie(mine), **FORM)
    r = d.request("POST", P + "/totp", headers=post, body=form({"pending": pending, "code": code(pyotp, TOM_SECRET)}))
    assert r.status == 401 and shown_secret(r.body) == secret  # the same secret, to try again
    r = d.request("POST", P + "/totp", headers=dict(post, Origin="https://evil.example"),
                  body=form({"pending": pending, "code": code(pyotp, secret)}))
    assert r.status == 403 and r.cookie() is None
    r = d.request("POST", P + "/totp", headers=post, body=form({"pending": pending, "code": code(pyotp, secret)}))
    assert r.status == 303 and r.headers["location"] == P + "/" and r.cookie(), r
    mine = r.cookie()
    assert "bob:%s:staff:%s" % (HASHES["bob"], secret) in d.users_file.read_text().splitlines()
    assert d.auth(other).status == 401 and d.auth(mine).headers["x-auth-amr"] == "pwd,otp"
    assert "off" not in re.sub(r"<[^>]+>", " ", d.auth(mine, P + "/").body.decode()).split("Two-factor sign-in")[1][:20]
    # removal needs a current code (the enrolment's code is used up)
    r = d.request("GET", P + "/totp", headers=session_cookie(mine))
    assert b"Turn off" in r.body and b"<svg" not in r.body
    post = dict(session_cookie(mine), **FORM)
    assert d.request("POST", P + "/totp", headers=post, body=form({"code": code(pyotp, secret)})).status == 401
    r = d.request("POST", P + "/totp", headers=post, body=form({"code": code(pyotp, secret, 1)}))
    assert r.status == 303 and r.cookie()
    assert "bob:%s:staff" % HASHES["bob"] in d.users_file.read_text().splitlines()
    assert d.auth(mine).status == 401 and d.auth(r.cookie()).headers["x-auth-amr"] == "pwd"


def test_totp_page_needs_a_fresh_password(authd):
    import jwt
    d = authd(users=USERS)
    r = d.request("GET", P + "/totp")
    assert r.status == 303 and r.headers["location"] == P + "/login?rd=" + P + "/totp"
    now = int(time.time())
    stale = jwt.encode({"sub": "bob", "iat": now, "exp": now + 3600, "auth_time": now - 301, "amr": ["pwd"],
                        "pwh": authd_py.parse_user_line(USERS[2]).fingerprint}, SECRET, algorithm="HS256")
    assert d.auth(stale).status == 200
    r = d.request("GET", P + "/totp", headers=session_cookie(stale))
    body = r.body.decode()
    assert r.status == 200 and 'name="password"' in body and 'name="rd" value="%s/totp"' % P in body
    assert "<svg" not in body and 'value="bob"' in body
    r = d.request("POST", P + "/totp", headers=dict(session_cookie(stale), **FORM), body=form({"code": "123456"}))
    assert 'name="password"' in r.body.decode() and r.cookie() is None
    # signing in again gives a fresh session, and back to P/totp
    r = d.request("POST", P + "/login", headers=dict(session_cookie(stale), **FORM),
                  body=form({"username": "bob", "password": PASSWORD["bob"], "rd": P + "/totp"}))
    assert r.status == 303 and r.headers["location"] == P + "/totp"
    assert b"<svg" in d.request("GET", P + "/totp", headers=session_cookie(r.cookie())).body


# ---------------------------------------------------------------------------
# Chromium through the real nginx (nginx.example.conf, as test_e2e.py runs it)
# ---------------------------------------------------------------------------

E2E_PASSWORD = {"erin": "erin-pw-5", "adam": "adam-pw-6"}
E2E_USERS = ["erin:%s:staff" % fast_hash(E2E_PASSWORD["erin"]), "adam:%s:admin" % fast_hash(E2E_PASSWORD["adam"])]
VIEWPORT = {"width": 480, "height": 960}


@pytest.fixture(scope="module")
def totp_site(nginx_tools, cert, tmp_path_factory):
    from test_e2e import Site
    site = Site(tmp_path_factory.mktemp("site"), *cert, authd_env={"AUTH_TOTP_GROUPS": "admin"}, users=E2E_USERS)
    yield site
    site.stop()


@pytest.fixture
def browser_page(totp_site, new_context):
    return new_context(viewport=VIEWPORT).new_page()


def shoot(page, name):
    """Screenshots light and dark in test-artifacts/; returns the light one's path."""
    ARTIFACTS.mkdir(exist_ok=True)
    for scheme in ("dark", "light"):
        page.emulate_media(color_scheme=scheme)
        page.screenshot(path=str(ARTIFACTS / ("totp-%s-%s.png" % (name, scheme))), full_page=True)
    return ARTIFACTS / ("totp-%s-light.png" % name)


def qr_from_screen(page, zxing):
    """The text of the one QR code on the screen, read by zxing-cpp from a
    screenshot of the viewport, in dark and in light mode (the same both times)."""
    texts = set()
    for scheme in ("dark", "light"):
        page.emulate_media(color_scheme=scheme)
        found = decode(zxing, image(png_grey(page.screenshot()), 1))
        assert len(found) == 1, (scheme, found)
        texts.add(found[0][0])
    assert len(texts) == 1
    return texts.pop()


def app_echo(page):
    return json.loads(page.locator("#echo").inner_text())


def sign_in(page, name):
    login_in_browser(page, name, E2E_PASSWORD[name])


def session_of(page):
    return auth_cookie(page.context)


def test_browser_enrolment_then_two_step_sign_in(totp_site, browser_page, pyotp, zxing):
    site, page = totp_site, browser_page
    url = site.url.replace("127.0.0.1", "example.com")  # the browser maps it to 127.0.0.1
    page.goto(url + "/wiki/page?x=1")
    sign_in(page, "erin")
    page.wait_for_url(url + "/wiki/page?x=1")
    assert app_echo(page)["headers"]["x-auth-amr"] == ["pwd"]
    page.goto(url + P + "/")
    page.get_by_role("link", name="set up").click()
    page.wait_for_url(url + P + "/totp")
    shoot(page, "enrol")  # docs/totp-enrol.png in README is a copy of the light one
    uri = qr_from_screen(page, zxing)
    otp = pyotp.parse_uri(uri)
    assert (otp.name, otp.issuer) == ("erin", "example.com")
    assert page.locator(".secret").inner_text().replace(" ", "") == otp.secret
    away_from_step_edge()
    page.get_by_label("Code shown by the app").fill(otp.now())
    page.get_by_role("button", name="Turn on two-factor sign-in").click()
    page.wait_for_url(url + P + "/")
    assert re.search(r"Two-factor sign-in\s+on", page.locator("dl").inner_text())
    shoot(page, "whoami")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(re.compile(re.escape(url + P + "/login") + r"(\?signed_out=1)?$"))
    page.goto(url + "/wiki/other")
    sign_in(page, "erin")
    code_box = page.get_by_label("The 6-digit code from your authenticator app")
    code_box.wait_for()
    assert session_of(page) is None
    shoot(page, "code")
    code_box.fill("%06d" % ((int(otp.now()) + 1) % 10 ** 6))
    page.get_by_role("button", name="Verify").click()
    page.get_by_role("alert").wait_for()
    assert "not right" in page.get_by_role("alert").inner_text()
    assert session_of(page) is None and page.get_by_label("The 6-digit code from your authenticator app").is_visible()
    shoot(page, "code-error")
    page.get_by_label("The 6-digit code from your authenticator app").fill(otp.at(time.time() + 30))
    page.get_by_role("button", name="Verify").click()
    page.wait_for_url(url + "/wiki/other")  # the page first asked for
    assert {k: app_echo(page)["headers"][k] for k in ("x-auth-user", "x-auth-amr")} == {
        "x-auth-user": ["erin"], "x-auth-amr": ["pwd,otp"]}


def test_required_group_member_enrols_at_sign_in_in_the_browser(totp_site, browser_page, pyotp, zxing):
    site, page = totp_site, browser_page
    page.goto(site.url + "/admin/panel")
    sign_in(page, "adam")
    page.get_by_role("heading", name="Set up two-factor sign-in").wait_for()
    assert "needs two-factor" in page.locator("main").inner_text() and session_of(page) is None
    shoot(page, "required")
    otp = pyotp.parse_uri(qr_from_screen(page, zxing))
    assert otp.name == "adam"
    away_from_step_edge()
    page.get_by_label("Code shown by the app").fill(otp.now())
    page.get_by_role("button", name="Turn on and sign in").click()
    page.wait_for_url(site.url + "/admin/panel")
    echo = app_echo(page)
    assert echo["headers"]["x-auth-user"] == ["adam"] and echo["headers"]["x-auth-amr"] == ["pwd,otp"]
    assert "adam:" in site.authd.users_file.read_text() and otp.secret in site.authd.users_file.read_text()


def test_totp_site_logged_no_errors(totp_site):
    log = totp_site.authd.log()
    assert "internal error" not in log and "Traceback" not in log, log
    assert not re.search(r"[A-Z2-7]{32}", log)  # no secret in the log
