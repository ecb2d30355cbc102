#!/usr/bin/env python3
"""A benchmark anchor, not a product: the auth_request endpoint as a straightforward
standard-library implementation writes it. http.server's ThreadingHTTPServer (a thread
per connection, HTTP/1.1 keep-alive, its defaults otherwise), the cookie parsed with
http.cookies, an HS256 JWT verified with hmac (HS256 only, constant-time compare, `exp`
in the future) and its `sub` looked up among the users file's names.

It answers every GET/HEAD with 200 (`X-Auth-User`) or 401, no body. bench/bench.py runs
it directly and behind nginx beside authd, so that authd's figures can be read against
what the obvious design gives on the same machine in the same run.

Usage: AUTH_TOKEN_SECRET=... anchor_hs256.py --users FILE [--port 0] [--cookie authToken]
Prints "listening on http://127.0.0.1:PORT" once it accepts connections.
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import sys
import time
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_hs256(token, key, now):
    """The claims of a valid, unexpired HS256 token, else None."""
    try:
        head, payload, signature = token.split(".")
        if json.loads(b64url_decode(head)).get("alg") != "HS256":
            return None
        expected = hmac.new(key, ("%s.%s" % (head, payload)).encode("ascii"), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, b64url_decode(signature)):
            return None
        claims = json.loads(b64url_decode(payload))
        if not isinstance(claims, dict) or not isinstance(claims.get("exp"), (int, float)) or claims["exp"] <= now:
            return None
        return claims
    except (ValueError, TypeError, AttributeError, UnicodeError):
        return None


def read_user_names(path):
    names = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and ":" in line:
                names.add(line.split(":", 1)[0])
    return names


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx's upstream keepalive needs

    def do_GET(self):
        user = self.user()
        self.send_response(200 if user else 401)
        if user:
            self.send_header("X-Auth-User", user)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def user(self):
        try:
            morsel = SimpleCookie(self.headers.get("Cookie", "")).get(self.server.cookie_name)
        except CookieError:
            return None
        if morsel is None:
            return None
        claims = verify_hs256(morsel.value, self.server.key, time.time())
        if claims and claims.get("sub") in self.server.users:
            return claims["sub"]
        return None

    def log_message(self, format, *args):
        pass  # no access log, as authd keeps none on the hot path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--users", required=True, help="users file (name:hash lines); only the names are used")
    p.add_argument("--cookie", default="authToken", help="cookie name (default authToken)")
    args = p.parse_args()
    secrets = re.split(r"[,\s]+", os.environ.get("AUTH_TOKEN_SECRET", "").strip())
    if not secrets[0]:
        sys.exit("anchor_hs256.py: set AUTH_TOKEN_SECRET")
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.key = secrets[0].encode("utf-8")
    server.users = read_user_names(args.users)
    server.cookie_name = args.cookie
    print("listening on http://%s:%d" % server.server_address[:2], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
