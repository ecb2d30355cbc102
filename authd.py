#!/usr/bin/env python3
"""authd: a login server for NGINX auth_request, in one standard-library file.

NGINX asks ``P/auth`` (P is AUTH_PREFIX, /__auth by default) on every
protected request; authd answers 200 (with X-Auth-User) when the browser holds
a valid signed session cookie, 401 when it does not. authd also serves the
login page, issues and refreshes the cookie, and logs out. Users live in a
plain text file. See README.md.

The file reads in the order data flows, one banner per section:
logging -> settings -> password hashes -> users file -> tokens ->
rate limits -> request and reply -> pages -> app -> server -> command line ->
main.
"""

import argparse
import asyncio
import base64
import binascii
import concurrent.futures
import ctypes
import ctypes.util
import fcntl
import functools
import getpass
import hashlib
import hmac
import html
import ipaddress
import json
import os
import re
import resource
import secrets
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict, namedtuple

__version__ = "1.0.0"

HERE = os.path.dirname(os.path.abspath(__file__))
DAY = 86400  # seconds


# ---------------------------------------------------------------------------
# Logging: one line per event on stderr. Under systemd (JOURNAL_STREAM set)
# each line starts with a syslog level such as <4>, which journald understands.
# ---------------------------------------------------------------------------

_LEVELS = {"error": 3, "warning": 4, "info": 6}
_log_lock = threading.Lock()


def log(level, message):
    prefix = "<%d>" % _LEVELS[level] if os.environ.get("JOURNAL_STREAM") else ""
    line = "%sauthd: %s\n" % (prefix, message)
    with _log_lock:
        try:
            sys.stderr.write(line)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the server down


def quoted(text):
    """Attacker-supplied text for a log line: one line, quoted, escaped."""
    return json.dumps(str(text)[:200])


class Failure(Exception):
    """An error for the operator: printed as one line, never a traceback."""


# ---------------------------------------------------------------------------
# Settings. Sources, highest first: command-line flags, environment, the .env
# file, built-in defaults. Every value is checked at start-up, and a bad one is
# reported by name. The parsers below are made by a few parameterised
# functions; the SETTINGS table says which one each setting uses.
# ---------------------------------------------------------------------------

SECRET_HINT = ("generate one with: python3 -c 'import secrets; "
               "print(secrets.token_urlsafe(48))'")


def boolean(value):
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def optional(value):
    return value or None


def whole_number(low, high, unit="", message=None):
    """A parser for a whole number from LOW to HIGH (ASCII digits only)."""
    message = message or "must be a whole number%s from %d to %d" % (unit and " of " + unit, low, high)

    def parse(value):
        text = value.strip()
        if not (text.isascii() and text.isdigit() and low <= int(text) <= high):
            raise ValueError(message)
        return int(text)
    return parse


def real_number(unit, example, high, zero_means=None):
    """A parser for a number of UNIT above 0 and at most HIGH; 0 too when
    ZERO_MEANS says what it means."""
    def parse(value):
        try:
            number = float(value)
        except ValueError:
            raise ValueError("must be a number of %s, such as %s" % (unit, example)) from None
        if not (0 < number <= high or (zero_means and number == 0)):  # NaN fails both
            raise ValueError("must be a number of %s above 0 and at most %g%s"
                             % (unit, high, ", or 0 for " + zero_means if zero_means else ""))
        return number
    return parse


def matching(pattern, message, convert=str):
    """A parser for text that PATTERN matches as a whole."""
    regex = re.compile(pattern)

    def parse(value):
        if not regex.fullmatch(value):
            raise ValueError(message)
        return convert(value)
    return parse


def one_of(*choices):
    """A parser for one of CHOICES, in any case; returns it as spelled here."""
    def parse(value):
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
        raise ValueError("must be %s or %s" % (", ".join(choices[:-1]), choices[-1]))
    return parse


def login_rate(value):
    match = re.fullmatch(r"\s*(\d{1,9})\s*/\s*(\d{1,9})\s*", value)
    if not match or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise ValueError("must be ATTEMPTS/SECONDS, such as 15/900")
    return int(match.group(1)), int(match.group(2))


def secret_list(value):
    """One or more HMAC keys, separated by commas or white space."""
    keys = [k for k in re.split(r"[,\s]+", value) if k]
    if not keys:
        return None
    for key in keys:
        if len(key) < 32:
            raise ValueError("each secret must be at least 32 characters (one has %d); %s"
                             % (len(key), SECRET_HINT))
    return keys


LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
Setting = namedtuple("Setting", "default parse attribute reloadable")
SETTINGS = {
    "AUTH_HOST": Setting("127.0.0.1", str, "host", False),
    "AUTH_PORT": Setting("3003", whole_number(0, 65535, message="must be a port number from 0 to 65535"),
                         "port", False),
    "AUTH_SOCKET": Setting("", optional, "socket", False),
    "AUTH_SOCKET_MODE": Setting("0660", matching(r"\s*0?[0-7]{3}\s*", "must be an octal file mode such as 0660",
                                                 lambda text: int(text, 8)), "socket_mode", False),
    "AUTH_TOKEN_SECRET": Setting("", secret_list, "token_secrets", True),
    "AUTH_SECRET_FILE": Setting("", optional, "secret_file", False),
    "AUTH_USERS_FILE": Setting(os.path.join(HERE, "users.txt"), str, "users_file", False),
    "AUTH_BYPASS": Setting("", optional, "bypass", True),
    "AUTH_EXPIRY_DAYS": Setting("7", real_number("days", "7 or 0.5", 36500), "expiry_days", True),
    "AUTH_MAX_AGE_DAYS": Setting("30", real_number("days", "30 or 0.5", 36500, zero_means="unlimited"),
                                 "max_age_days", True),
    "AUTH_COOKIE_NAME": Setting("authToken", matching(
        r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", "must be a cookie name: 1 to 64 letters, digits or !#$%&'*+.^_`|~-"),
        "cookie_name", True),
    "AUTH_COOKIE_SECURE": Setting("true", boolean, "cookie_secure", True),
    "AUTH_COOKIE_DOMAIN": Setting("", matching(r"(\.?%s(\.%s)*)?" % (LABEL, LABEL),
                                               "must be a domain name such as example.com", optional),
                                  "cookie_domain", True),
    "AUTH_COOKIE_SAMESITE": Setting("Lax", one_of("Strict", "Lax", "None"), "cookie_samesite", True),
    "AUTH_LOGIN_URL": Setting("", matching(r"(https?://%s(\.%s)*(:\d{1,5})?(/[!$-~]*)?)?" % (LABEL, LABEL),
                                           "must be an absolute http(s) URL without user name or #fragment, "
                                           "such as https://auth.example.com/__auth/login", optional),
                              "login_url", True),
    "AUTH_PREFIX": Setting("/__auth", matching(r"(/[A-Za-z0-9._~-]+)+",
                                               "must be a path such as /__auth (no trailing slash)"), "prefix", False),
    "AUTH_LOGIN_RATE": Setting("15/900", login_rate, "login_rate", True),
    "AUTH_MAX_CONNECTIONS": Setting("10000", whole_number(1, 1000000), "max_connections", False),
    "AUTH_CACHE_SECONDS": Setting("0", whole_number(0, 3600, "seconds"), "cache_seconds", True),
    "AUTH_IDLE_TIMEOUT": Setting("75", real_number("seconds", "75", DAY), "idle_timeout", True),
    "AUTH_HEADER_TIMEOUT": Setting("10", real_number("seconds", "10", DAY), "header_timeout", True),
}
SECRET_SETTINGS = ("AUTH_TOKEN_SECRET", "AUTH_BYPASS")  # never echoed in a message


class Settings:
    """The checked settings, as attributes named in SETTINGS."""

    def __init__(self, values):
        for name, setting in SETTINGS.items():
            setattr(self, setting.attribute, values[name])
        if self.secret_file is None:
            self.secret_file = os.path.join(os.path.dirname(os.path.abspath(self.users_file)), ".authd_secret")

    def keep_restart_only(self, running):
        """On reload, keep the RUNNING values of the settings that only a
        restart can change; returns the names of those that differed."""
        changed = []
        for name, setting in SETTINGS.items():
            if not setting.reloadable and getattr(self, setting.attribute) != getattr(running, setting.attribute):
                changed.append(name)
                setattr(self, setting.attribute, getattr(running, setting.attribute))
        return changed


class SettingsError(Failure):
    def __init__(self, problems, values=None):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.values = values or {}  # the settings that did parse (check still reads the users file)


def parse_env_line(line):
    """One .env line -> (key, value), or None for blanks and comments.

    Raises ValueError for a line that is not KEY=value."""
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    if text.startswith("export ") or text.startswith("export\t"):
        text = text[7:].lstrip()
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
        raise ValueError("expected KEY=value")
    value = raw.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        if end < 0:
            raise ValueError("unterminated quote in %s" % key)
        rest = value[end + 1:].strip()
        if rest and not rest.startswith("#"):
            raise ValueError("text after the closing quote in %s" % key)
        value = value[1:end]
    else:
        value = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
    return key, value


def read_env_file(path, required):
    """The KEY=value pairs of a .env file; warnings for unknown AUTH_ keys."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read(1 << 20).splitlines()
    except FileNotFoundError:
        if required:
            raise SettingsError(["%s: no such file (the --env option)" % path])
        return {}, []
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(["%s: cannot read: %s" % (path, getattr(e, "strerror", None) or e)])
    values, problems, warnings = {}, [], []
    for number, line in enumerate(lines, 1):
        try:
            pair = parse_env_line(line)
        except ValueError as e:
            problems.append("%s line %d: %s" % (path, number, e))
            continue
        if pair is None:
            continue
        key, value = pair
        if key.startswith("AUTH_") and key not in SETTINGS:
            warnings.append("%s line %d: unknown setting %s (ignored)" % (path, number, key))
        values[key] = value
    if problems:
        raise SettingsError(problems)
    return values, warnings


def load_settings(flags=None, environ=None, env_file=None, env_required=False):
    """Settings from flags > environment > .env > defaults. Raises SettingsError
    naming every bad key; returns (settings, warnings)."""
    flags = flags or {}
    environ = os.environ if environ is None else environ
    env_file = env_file or os.path.join(HERE, ".env")
    file_values, warnings = read_env_file(env_file, env_required)
    values, problems = {}, []
    for name, setting in SETTINGS.items():
        raw = next((source[name] for source in (flags, environ, file_values) if source.get(name) is not None),
                   setting.default)
        try:
            values[name] = setting.parse(str(raw))
        except ValueError as e:
            problems.append("%s: %s (got %r)" % (name, e, "..." if name in SECRET_SETTINGS else raw))
    if values.get("AUTH_COOKIE_SAMESITE") == "None" and values.get("AUTH_COOKIE_SECURE") is False:
        problems.append("AUTH_COOKIE_SAMESITE: None needs AUTH_COOKIE_SECURE=true (browsers refuse it otherwise)")
    if problems:
        raise SettingsError(problems, values)
    return Settings(values), warnings


def load_secrets(settings, create=True):
    """The HMAC keys: AUTH_TOKEN_SECRET, else the secret file (made on first start)."""
    if settings.token_secrets:
        return [k.encode("utf-8") for k in settings.token_secrets]
    path = settings.secret_file
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(65536)
    except FileNotFoundError:
        if not create:
            raise Failure("%s: no secret file yet (authd creates it on first start)" % path)
        text = secrets.token_urlsafe(48)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_secrets(settings, create=False)  # another process just made it
        except OSError as e:
            raise Failure("%s: cannot create the secret file: %s (set AUTH_SECRET_FILE or AUTH_TOKEN_SECRET)"
                          % (path, e.strerror))
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        log("info", "created a new secret in %s" % path)
    except (OSError, UnicodeDecodeError) as e:
        raise Failure("%s: cannot read the secret file: %s" % (path, getattr(e, "strerror", None) or e))
    try:
        keys = secret_list(text)
    except ValueError as e:
        raise Failure("%s: %s" % (path, e))
    if not keys:
        raise Failure("%s: the secret file is empty; delete it to have a new one made" % path)
    return [k.encode("utf-8") for k in keys]


# ---------------------------------------------------------------------------
# Password hashes. Native: scrypt in passlib's "$scrypt$ln=,r=,p=$salt$hash"
# form. Legacy formats from htpasswd and crypt(3) verify too, and are replaced
# by scrypt at the next successful login.
# ---------------------------------------------------------------------------

SCRYPT_LN, SCRYPT_R, SCRYPT_P = 17, 8, 1          # 128 MiB and ~0.4 s per hash
SCRYPT_MAX_MEMORY = 1 << 30                        # refuse hashes that ask for more
HASH_SLOTS = threading.BoundedSemaphore(2)         # scrypt runs at most this many at once
HASH_WAIT = 10.0                                   # seconds a login waits for a slot
SCRYPT_RE = re.compile(r"\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,2})\$([A-Za-z0-9+/.]{1,128})\$([A-Za-z0-9+/.]{16,128})")
CRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$", "$5$", "$6$", "$y$")
CRYPT_SAMPLES = {
    "$2a$": "$2a$04$abcdefghijklmnopqrstuu", "$2b$": "$2b$04$abcdefghijklmnopqrstuu",
    "$2y$": "$2y$04$abcdefghijklmnopqrstuu", "$5$": "$5$rounds=1000$abcdefgh",
    "$6$": "$6$rounds=1000$abcdefgh", "$y$": "$y$j75$abcdefghijklmnop",
}


class HashBusy(Exception):
    """Every hashing slot stayed taken for HASH_WAIT seconds."""


def _b64_decode(text):
    text = text.replace(".", "+")  # passlib's "adapted base64" uses . for +
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _b64_encode(data):
    return base64.b64encode(data).decode("ascii").rstrip("=")


def parse_scrypt_hash(value):
    """-> (n, r, p, salt, checksum) or ValueError."""
    match = SCRYPT_RE.fullmatch(value)
    if not match:
        raise ValueError("malformed $scrypt$ hash")
    ln, r, p = int(match.group(1)), int(match.group(2)), int(match.group(3))
    if not (1 <= ln <= 24 and 1 <= r <= 64 and 1 <= p <= 16) or 128 * r * (2 ** ln + p + 2) > SCRYPT_MAX_MEMORY:
        raise ValueError("$scrypt$ parameters out of range (ln=%d, r=%d, p=%d)" % (ln, r, p))
    try:
        return 2 ** ln, r, p, _b64_decode(match.group(4)), _b64_decode(match.group(5))
    except (binascii.Error, ValueError):
        raise ValueError("malformed base64 in $scrypt$ hash") from None


class hash_slot:
    """Bounds concurrent hashing: scrypt takes 128 MiB a run."""

    def __enter__(self):
        if not HASH_SLOTS.acquire(timeout=HASH_WAIT):
            raise HashBusy()

    def __exit__(self, *exc):
        HASH_SLOTS.release()


def scrypt(password, salt, n, r, p, length):
    memory = 128 * r * (n + p + 2) + (1 << 20)
    with hash_slot():
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=memory, dklen=length)


def hash_password(password):
    salt = secrets.token_bytes(16)
    checksum = scrypt(password.encode("utf-8"), salt, 2 ** SCRYPT_LN, SCRYPT_R, SCRYPT_P, 32)
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (SCRYPT_LN, SCRYPT_R, SCRYPT_P, _b64_encode(salt), _b64_encode(checksum))


def is_legacy_hash(value):
    """Formats replaced by scrypt at the next login. (scrypt hashes keep their
    parameters; 'passwd' re-hashes with the current ones.)"""
    return not value.startswith("$scrypt$")


# A random hash with the default cost, whose password nobody knows: an unknown
# user name is checked against it, so it costs the same time as a known one.
DUMMY_HASH = "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (SCRYPT_LN, SCRYPT_R, SCRYPT_P,
                                                  _b64_encode(secrets.token_bytes(16)), _b64_encode(secrets.token_bytes(32)))

_ITOA64 = "./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def apr1_md5(password, salt):
    """Apache's $apr1$ MD5-crypt (htpasswd -m), -> the full hash string."""
    magic = b"$apr1$"
    salt = salt[:8]
    alternate = hashlib.md5(password + salt + password).digest()
    ctx = password + magic + salt
    for i in range(len(password), 0, -16):
        ctx += alternate[:min(16, i)]
    i = len(password)
    while i:
        ctx += b"\0" if i & 1 else password[:1]
        i >>= 1
    final = hashlib.md5(ctx).digest()
    for i in range(1000):
        step = (password if i & 1 else final) + (salt if i % 3 else b"") + (password if i % 7 else b"")
        final = hashlib.md5(step + (final if i & 1 else password)).digest()
    out = ""
    for a, b, c in ((0, 6, 12), (1, 7, 13), (2, 8, 14), (3, 9, 15), (4, 10, 5)):
        v = (final[a] << 16) | (final[b] << 8) | final[c]
        for _ in range(4):
            out += _ITOA64[v & 63]
            v >>= 6
    v = final[11]
    for _ in range(2):
        out += _ITOA64[v & 63]
        v >>= 6
    return "$apr1$" + salt.decode("ascii") + "$" + out


_libcrypt = None
_libcrypt_lock = threading.Lock()  # crypt(3) keeps its result in static storage


def system_crypt(password, setting):
    """crypt(3) from the system's libcrypt, or None when it is missing or refuses."""
    global _libcrypt
    with _libcrypt_lock:
        if _libcrypt is None:
            name = ctypes.util.find_library("crypt")
            try:
                _libcrypt = ctypes.CDLL(name or "libcrypt.so.1")
                _libcrypt.crypt.restype = ctypes.c_char_p
                _libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            except (OSError, AttributeError):
                _libcrypt = False
        if not _libcrypt:
            return None
        result = _libcrypt.crypt(password, setting.encode("ascii"))
    if not result or result.startswith(b"*"):
        return None
    return result.decode("ascii", "replace")


@functools.lru_cache(maxsize=None)
def crypt_supports(prefix):
    return system_crypt(b"probe", CRYPT_SAMPLES[prefix]) is not None


def check_hash_format(value):
    """ValueError unless this system can verify VALUE."""
    if value.startswith("$scrypt$"):
        parse_scrypt_hash(value)
    elif value.startswith("$apr1$"):
        if not re.fullmatch(r"\$apr1\$[^$]{1,8}\$[./0-9A-Za-z]{22}", value):
            raise ValueError("malformed $apr1$ hash")
    elif value.startswith("{SHA}"):
        try:
            if len(base64.b64decode(value[5:], validate=True)) != 20:
                raise ValueError
        except (binascii.Error, ValueError):
            raise ValueError("malformed {SHA} hash") from None
    elif value.startswith(CRYPT_PREFIXES):
        prefix = next(p for p in CRYPT_PREFIXES if value.startswith(p))
        if not re.fullmatch(r"\$[0-9a-z]{1,2}\$[./0-9A-Za-z$=,]{8,200}", value):
            raise ValueError("malformed %s hash" % prefix)
        cost = re.match(r"\$2.\$(\d\d)\$|\$[56]\$rounds=(\d+)\$", value)
        if cost and (int(cost.group(1) or 0) > 16 or int(cost.group(2) or 0) > 1000000):
            raise ValueError("%s hash is too costly to verify (bcrypt cost over 16 or over a million rounds)" % prefix)
        if not crypt_supports(prefix):
            raise ValueError("this system's libcrypt cannot verify %s hashes; set a new password with "
                             "'authd.py passwd NAME'" % prefix)
    else:
        raise ValueError("unknown hash format %s... (authd knows $scrypt$, $apr1$, {SHA}, $2y$/$2b$/$2a$ "
                         "bcrypt, $5$, $6$ and $y$)" % quoted(value[:8]))


def verify_password(password, stored):
    """True if PASSWORD matches the stored hash. Compares in constant time."""
    secret = password.encode("utf-8")
    if stored.startswith("$scrypt$"):
        n, r, p, salt, checksum = parse_scrypt_hash(stored)
        return hmac.compare_digest(scrypt(secret, salt, n, r, p, len(checksum)), checksum)
    if stored.startswith("$apr1$"):
        salt = stored[6:].split("$", 1)[0].encode("ascii")
        return hmac.compare_digest(apr1_md5(secret, salt).encode(), stored.encode())
    if stored.startswith("{SHA}"):
        digest = "{SHA}" + base64.b64encode(hashlib.sha1(secret).digest()).decode("ascii")
        return hmac.compare_digest(digest.encode(), stored.encode())
    if stored.startswith(CRYPT_PREFIXES):
        if b"\0" in secret:
            return False
        with hash_slot():
            result = system_crypt(secret, stored)
        return result is not None and hmac.compare_digest(result.encode(), stored.encode())
    return False


# ---------------------------------------------------------------------------
# Users file: "name:hash" or "name:hash:group1,group2" per line, # comments.
# Edits are atomic (temporary file, fsync, rename) under a lock file, so a
# crash leaves the old file or the new one, never half of one.
# ---------------------------------------------------------------------------

NAME_RE = re.compile(r"(?!#)[^:,\s\x00-\x1f\x7f-\x9f]{1,64}")  # a line starting with # is a comment
MAX_USERS_FILE = 16 << 20


def valid_name(name):
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def check_name(name, what="user name"):
    """ValueError, stating the rules, unless NAME may name a user or a group."""
    if not valid_name(name):
        raise ValueError("bad %s %s: 1 to 64 characters, no ':', ',', spaces or control characters"
                         % (what, quoted(name)))


class User:
    __slots__ = ("name", "hash", "groups", "admin", "fingerprint", "allow_headers", "allow_response")

    def __init__(self, name, password_hash, groups):
        self.name = name
        self.hash = password_hash
        self.groups = tuple(groups)
        self.admin = "admin" in self.groups
        # Tokens carry this fingerprint of the stored hash, so a new password
        # (a new salt, a new hash) invalidates every older token.
        self.fingerprint = base64.urlsafe_b64encode(
            hashlib.sha256(password_hash.encode("utf-8")).digest()[:9]).decode("ascii")
        # The hot path sends these bytes as they are.
        self.allow_headers = ("X-Auth-User: %s\r\nX-Auth-Groups: %s\r\nX-Auth-Admin: %s\r\n" % (
            name, ",".join(self.groups), "true" if self.admin else "false")).encode("utf-8")
        self.allow_response = (b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n" + self.allow_headers
                               + b"Content-Length: 0\r\n\r\n")

    def line(self):
        return ":".join([self.name, self.hash] + ([",".join(self.groups)] if self.groups else []))


class UsersFileError(Failure):
    def __init__(self, problems):
        super().__init__("\n".join(problems))
        self.problems = problems


def is_plaintext(field):
    return not (field.startswith("$") or field.startswith("{SHA}"))


def parse_user_line(line):
    """One users-file line -> User, None (comment or blank), or ValueError.

    A User whose hash does not start with $ or {SHA} holds a plaintext password
    that the caller must hash (see is_plaintext)."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":")
    if len(fields) < 2:
        raise ValueError("expected name:hash or name:hash:groups")
    if len(fields) > 3:
        raise ValueError("too many ':' (expected name:hash or name:hash:groups)")
    name, password_hash = fields[0], fields[1]
    check_name(name)
    if not password_hash:
        raise ValueError("user %s has an empty password" % name)
    groups = fields[2].split(",") if len(fields) == 3 and fields[2] else []
    for group in groups:
        check_name(group, "group name")
    if not is_plaintext(password_hash):
        check_hash_format(password_hash)
    return User(name, password_hash, groups)


def parse_users_text(text, path):
    """The whole file -> (entries, users). entries keeps every line in order:
    a str for comments and blanks, a User for users. Raises UsersFileError
    listing every bad line."""
    entries, users, problems, first_seen = [], {}, [], {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            user = parse_user_line(line)
        except ValueError as e:
            problems.append("%s line %d: %s" % (path, number, e))
            continue
        if user is None:
            entries.append(line)
            continue
        if user.name in users:
            problems.append("%s line %d: user %s is already on line %d" % (path, number, user.name, first_seen[user.name]))
            continue
        users[user.name] = user
        first_seen[user.name] = number
        entries.append(user)
    if problems:
        raise UsersFileError(problems)
    return entries, users


def read_users_file(path):
    """(entries, users) of the users file; an absent file has no users."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_USERS_FILE + 1)
    except FileNotFoundError:
        return [], {}
    except OSError as e:
        raise UsersFileError(["%s: cannot read: %s" % (path, e.strerror)])
    if len(data) > MAX_USERS_FILE:
        raise UsersFileError(["%s: larger than %d MiB" % (path, MAX_USERS_FILE >> 20)])
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsersFileError(["%s: not UTF-8 text (byte %d)" % (path, e.start)])
    return parse_users_text(text, path)


def render_users(entries):
    return "".join((e.line() if isinstance(e, User) else e) + "\n" for e in entries)


class UsersFileLock:
    """An exclusive lock on PATH.lock, held while the file is read, changed and
    replaced, so two editors (two adduser runs, or the server and adduser)
    never lose each other's change."""

    def __init__(self, path):
        folder, base = os.path.split(os.path.abspath(path))
        self.path = os.path.join(folder, "." + base + ".lock")
        self.users_path = path

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise Failure("%s: cannot create the lock file: %s (the folder must be writable)"
                          % (self.path, e.strerror))
        if os.geteuid() == 0:
            # root running the command line must not leave a lock file that
            # the service's own user cannot open next time
            try:
                st = os.stat(self.users_path)
                if (st.st_uid, st.st_gid) != (0, 0):
                    os.fchown(self.fd, st.st_uid, st.st_gid)
            except OSError:
                pass
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _temp_prefix(path):
    folder, base = os.path.split(os.path.abspath(path))
    return folder, "." + base + ".tmp-"


def remove_stale_temp_files(path):
    """Temporary files left by a writer that was killed. Call with the lock held."""
    folder, prefix = _temp_prefix(path)
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def write_file_atomically(path, text, default_mode=0o600):
    """Replace PATH with TEXT: a temporary file in the same folder, fsync,
    rename, fsync of the folder. Keeps the old file's mode and owner."""
    folder, prefix = _temp_prefix(path)
    try:
        st = os.stat(path)
        mode, owner = stat.S_IMODE(st.st_mode), (st.st_uid, st.st_gid)
    except FileNotFoundError:
        mode, owner = default_mode, None
    fd, temp = tempfile.mkstemp(dir=folder, prefix=prefix)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), mode)
            if owner and owner != (os.geteuid(), os.getegid()):
                try:
                    os.fchown(f.fileno(), *owner)
                except PermissionError:
                    pass
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def edit_users_file(path, change):
    """Lock, read, call change(entries, users) -> message, write back
    atomically (only if something changed), return the message."""
    with UsersFileLock(path):
        remove_stale_temp_files(path)
        entries, users = read_users_file(path)
        before = render_users(entries)
        message = change(entries, users)
        after = render_users(entries)
        if after != before:
            write_file_atomically(path, after)
        return message


def set_hash(entries, name, new_hash):
    """Replace the hash of user NAME in ENTRIES (a users file being edited)."""
    for i, entry in enumerate(entries):
        if isinstance(entry, User) and entry.name == name:
            entries[i] = User(name, new_hash, entry.groups)
            return
    raise KeyError(name)


def hash_plaintext_lines(path):
    """Replace plaintext passwords in the users file with scrypt hashes.
    Returns the names that were converted."""
    def convert(entries, users):
        names = [u.name for u in users.values() if is_plaintext(u.hash)]
        for name in names:
            set_hash(entries, name, hash_password(users[name].hash))
        return names

    return edit_users_file(path, convert)


class UsersStore:
    """The users the server answers from. Readers take self.users without a
    lock: a reload swaps the whole dict at once."""

    def __init__(self, path):
        self.path = path
        self.users = {}
        self.signature = None

    def file_signature(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self):
        """Read the file (hashing any plaintext passwords first). Raises
        UsersFileError and keeps the users it had."""
        signature = self.file_signature()
        _, users = read_users_file(self.path)
        if any(is_plaintext(u.hash) for u in users.values()):
            names = hash_plaintext_lines(self.path)
            log("info", "hashed the plaintext passwords of %s in %s" % (", ".join(names), self.path))
            signature = self.file_signature()
            _, users = read_users_file(self.path)
        self.users, self.signature = users, signature
        return users

    def changed(self):
        return self.file_signature() != self.signature

    def upgrade_hash(self, name, password):
        """After a login with a legacy hash: store a new scrypt hash."""
        new_hash = hash_password(password)
        edit_users_file(self.path, lambda entries, users: set_hash(entries, name, new_hash))
        self.load()
        return self.users.get(name)


# ---------------------------------------------------------------------------
# Tokens: HS256 JWTs, which any JWT library verifies with the secret. The
# verifier accepts exactly what authd issues and nothing looser.
# ---------------------------------------------------------------------------

MAX_TOKEN = 4096
REFRESH_AFTER = 60                 # seconds; a token older than this is re-issued
CLOCK_SKEW = 5                     # seconds of "iat in the future" tolerated
TOKEN_HEADER = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=").decode("ascii")
B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text):
    if not B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("bad base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _no_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError("duplicate key %r" % key)
        result[key] = value
    return result


def _no_constants(name):
    raise ValueError("%s is not JSON" % name)


MAX_JSON_DEPTH = 20


def _json_depth(text):
    """The deepest nesting of [ and { outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def strict_json(data):
    """Parse JSON bytes: UTF-8, no duplicate keys, no NaN, bounded nesting
    (the same bound on every Python version, not the interpreter's recursion limit)."""
    text = data.decode("utf-8")
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        raise ValueError("JSON nested more than %d deep" % MAX_JSON_DEPTH)
    return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)


def sign_token(claims, key):
    body = TOKEN_HEADER + "." + b64url_encode(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    signature = hmac.new(key, body.encode("ascii"), hashlib.sha256).digest()
    return body + "." + b64url_encode(signature)


def _is_int(value):
    return type(value) is int


def decode_token(token, keys, now):
    """The claims of a token that authd could have issued and that has not
    expired, else None. Checks: size, shape, base64url, header (HS256 only,
    no crit or other fields), signature in constant time against every key,
    then the claims' types and times."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or token.count(".") != 2:
        return None
    header, payload, signature = token.split(".")
    try:
        if header != TOKEN_HEADER:
            fields = strict_json(b64url_decode(header))
            if not isinstance(fields, dict) or fields.get("alg") != "HS256" \
                    or fields.get("typ", "JWT") != "JWT" or set(fields) - {"alg", "typ"}:
                return None
        given = b64url_decode(signature)
        signing_input = (header + "." + payload).encode("ascii")
        matched = False
        for key in keys:
            expected = hmac.new(key, signing_input, hashlib.sha256).digest()
            matched |= hmac.compare_digest(expected, given)
        if not matched:
            return None
        claims = strict_json(b64url_decode(payload))
    except (ValueError, UnicodeError, RecursionError, binascii.Error):
        return None
    if not isinstance(claims, dict):
        return None
    sub, iat, exp, auth_time = claims.get("sub"), claims.get("iat"), claims.get("exp"), claims.get("auth_time")
    if not (valid_name(sub) and _is_int(iat) and _is_int(exp) and _is_int(auth_time)
            and isinstance(claims.get("pwh"), str) and claims["pwh"].isascii()):
        return None
    nbf = claims.get("nbf", iat)
    if not _is_int(nbf) or nbf > now + CLOCK_SKEW or iat > now + CLOCK_SKEW or auth_time > iat or exp <= now:
        return None
    return claims


def issue_token(user, auth_time, now, settings, key):
    """A new token for USER; its life slides by AUTH_EXPIRY_DAYS but never
    past AUTH_MAX_AGE_DAYS after the password was typed."""
    exp = now + int(settings.expiry_days * DAY)
    if settings.max_age_days:
        exp = min(exp, auth_time + int(settings.max_age_days * DAY))
    claims = {"sub": user.name, "iat": now, "exp": exp, "auth_time": auth_time, "pwh": user.fingerprint}
    return sign_token(claims, key), exp - now


# ---------------------------------------------------------------------------
# Login rate limits: fixed windows per client address and per user name, in a
# bounded table (the oldest entries go first when it is full).
# ---------------------------------------------------------------------------

NAME_LIMIT_FACTOR = 4      # a user name may take 4x one address's failed attempts; an address 4x its logins


class RateLimiter:
    def __init__(self, limit, window, max_keys=50000):
        self.limit, self.window, self.max_keys = limit, window, max_keys
        self.entries = OrderedDict()      # key -> [window end, count]
        self.lock = threading.Lock()

    def hit(self, key, now):
        """Count an attempt. Returns 0 if allowed, else seconds until allowed."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None or entry[0] <= now:
                entry = [now + self.window, 0]
                self.entries.pop(key, None)
                self.entries[key] = entry
                while len(self.entries) > self.max_keys:
                    self.entries.popitem(last=False)
            if entry[1] >= self.limit:
                return max(1, int(entry[0] - now + 0.999))
            entry[1] += 1
            return 0

    def refund(self, key):
        with self.lock:
            entry = self.entries.get(key)
            if entry and entry[1] > 0:
                entry[1] -= 1


def rate_key(address):
    """The login rate limit's key for a client: an IPv4 address, or the /64 of
    an IPv6 one (a single host usually holds a whole /64 and can rotate through it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if ip.version == 6:
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network("%s/64" % ip, strict=False))
    return address


# ---------------------------------------------------------------------------
# Request and reply: the HTTP/1.1 messages. The parser is strict and bounded:
# this is where hostile bytes stop.
# ---------------------------------------------------------------------------

MAX_REQUEST_LINE = 8192
MAX_HEAD = 16384
MAX_HEADERS = 100
MAX_BODY = 8192
TCHAR_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token characters: methods, field names
SPACE_OR_CONTROL_RE = re.compile(r"[\x00-\x20\x7f]")
REASONS = {200: "OK", 302: "Found", 303: "See Other", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 411: "Length Required",
           413: "Content Too Large", 414: "URI Too Long", 415: "Unsupported Media Type",
           429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable", 505: "HTTP Version Not Supported"}
SINGLE_HEADERS = ("host", "content-length", "authorization", "x-auth-bypass",
                  "x-original-uri", "x-original-host", "x-original-remote-addr", "x-real-ip")


class HTTPError(Exception):
    """A request that cannot be served: answered with STATUS, then closed."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Request:
    __slots__ = ("method", "target", "path", "query", "version", "headers", "body", "peer", "keep_alive")

    def content_type(self):
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def wants_json(self):
        accept = self.headers.get("accept", "")
        return self.content_type() == "application/json" or (
            "application/json" in accept and "text/html" not in accept) or \
            self.headers.get("sec-fetch-mode", "") in ("cors", "same-origin")

    def site_host(self):
        return self.headers.get("x-original-host") or self.headers.get("host", "")

    def client_ip(self):
        """The client's address: the one nginx vouches for when nginx (a
        loopback or unix-socket peer) is the peer, else the peer's."""
        peer = self.peer
        if is_loopback(peer):
            for name in ("x-original-remote-addr", "x-real-ip"):
                claimed = self.headers.get(name, "").strip()
                if claimed:
                    try:
                        return str(ipaddress.ip_address(claimed.split("%", 1)[0]))
                    except ValueError:
                        break
        return peer or "unix"


@functools.lru_cache(maxsize=1024)
def is_loopback(peer):
    """True for 127.0.0.0/8, ::1 and a unix socket (empty peer)."""
    if not peer:
        return True
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or bool(mapped and mapped.is_loopback)


class Reply:
    """What a handler answers. USER makes it an "allowed" answer carrying the
    identity headers; DATA is a JSON body, PAGE an HTML page (which gets the
    page security headers)."""
    __slots__ = ("status", "headers", "body", "user", "content_type", "page_headers")

    def __init__(self, status, headers=None, body=b"", user=None, data=None, page=None, content_type=None):
        self.status, self.headers, self.user = status, headers or [], user
        self.body, self.content_type, self.page_headers = body, content_type, False
        if data is not None:
            self.body = json.dumps(data).encode("utf-8")
            self.content_type = "application/json"
        elif page is not None:
            self.body, self.content_type, self.page_headers = page, "text/html; charset=utf-8", True


def text_reply(status, text):
    return Reply(status, body=(text + "\n").encode("utf-8"), content_type="text/plain; charset=utf-8")


def parse_request_line(line):
    """b"GET /path HTTP/1.1" -> (method, target, version); HTTPError otherwise."""
    if len(line) > MAX_REQUEST_LINE:
        raise HTTPError(414, "request line too long")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise HTTPError(505 if re.fullmatch(rb"HTTP/[0-9]\.[0-9]", version) else 400, "unsupported HTTP version")
    try:
        method, target = method.decode("ascii"), target.decode("ascii")
    except UnicodeDecodeError:
        raise HTTPError(400, "non-ASCII request line") from None
    if not TCHAR_RE.fullmatch(method):
        raise HTTPError(400, "malformed method")
    if not target.startswith("/") or SPACE_OR_CONTROL_RE.search(target):
        raise HTTPError(400, "request target must be a path starting with /")
    return method, target, version


HEADER_LINE_RE = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\r?")


def parse_header_fields(lines):
    """Header lines -> {lower-case name: value}; HTTPError for anything
    malformed, and for a repeat of a field that must be single."""
    headers = {}
    for line in lines:
        match = HEADER_LINE_RE.fullmatch(line)
        if match is None:
            if line in ("", "\r"):
                continue
            raise HTTPError(400, header_line_problem(line))
        name, value = match.group(1).lower(), match.group(2).rstrip(" \t")
        if name in headers:
            if name in SINGLE_HEADERS:
                raise HTTPError(400, "repeated %s header" % name)
            value = headers[name] + ("; " if name == "cookie" else ", ") + value
        headers[name] = value
    return headers


def header_line_problem(line):
    """What is wrong with a header line that HEADER_LINE_RE refused."""
    if line[:1] in (" ", "\t"):
        return "folded header lines are not allowed"
    name, sep, _ = line.partition(":")
    if not sep or not TCHAR_RE.fullmatch(name):
        return "malformed header field"
    return "control character in header %s" % name


def parse_head(head):
    """The bytes of a request head -> Request (without body)."""
    lines = head.decode("latin-1").split("\n")
    method, target, version = parse_request_line(lines[0].rstrip("\r").encode("latin-1"))
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, "too many header fields")
    request = Request()
    request.method, request.target, request.version = method, target, version
    request.headers = headers = parse_header_fields(lines[1:])
    request.path, _, request.query = target.partition("?")
    connection = headers.get("connection", "").lower()
    request.keep_alive = ("close" not in connection) if version == b"HTTP/1.1" else ("keep-alive" in connection)
    request.body = b""
    return request


def body_length(request):
    if "transfer-encoding" in request.headers:
        raise HTTPError(411, "Transfer-Encoding is not supported; send Content-Length")
    value = request.headers.get("content-length")
    if value is None:
        return 0
    if not (value.isascii() and value.isdigit()):
        raise HTTPError(400, "malformed Content-Length")
    digits = value.lstrip("0")
    length = int(digits or "0") if len(digits) <= 12 else MAX_BODY + 1
    if length > MAX_BODY:
        raise HTTPError(413, "body larger than %d bytes" % MAX_BODY)
    return length


def render_reply(reply, request, close):
    """Reply -> the bytes of an HTTP/1.1 response."""
    if reply.user is not None and not reply.headers and not close and reply.status == 200 \
            and not reply.body and reply.content_type is None and request.version == b"HTTP/1.1":
        return reply.user.allow_response
    lines = ["HTTP/1.1 %d %s" % (reply.status, REASONS.get(reply.status, "Unknown")), "Cache-Control: no-store"]
    if reply.content_type:
        lines.append("Content-Type: " + reply.content_type)
    if reply.page_headers:
        lines.extend("%s: %s" % h for h in PAGE_HEADERS)
    lines.extend("%s: %s" % h for h in reply.headers)
    lines.append("Content-Length: %d" % len(reply.body))
    if close:
        lines.append("Connection: close")
    elif request is not None and request.version == b"HTTP/1.0":
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n").encode("latin-1", "replace")
    if reply.user is not None:
        head += reply.user.allow_headers
    head += b"\r\n"
    if request is not None and request.method == "HEAD":
        return head
    return head + reply.body


def cookie_values(header, name):
    """Every value of cookie NAME in a Cookie header (a browser may send two)."""
    if name not in header:
        return []
    values = []
    for part in header.split(";"):
        key, sep, value = part.strip().partition("=")
        if sep and key == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            values.append(value)
            if len(values) == 4:
                break
    return values


def host_name(host):
    """'Example.COM:8080' -> 'example.com'; '[::1]:80' -> '::1'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def safe_target(target):
    """TARGET if it is a path on this site, else '/'. No scheme, no host, no
    '//' or '/\\' (which browsers read as another host), no control characters."""
    if not isinstance(target, str) or not target.startswith("/") or len(target) > 2048:
        return "/"
    if target[1:2] in ("/", "\\") or any(ord(c) < 32 or ord(c) == 127 for c in target):
        return "/"
    # Non-ASCII goes out percent-encoded, so a Location header stays ASCII.
    return urllib.parse.quote(target, safe="/?#[]@!$&'()*+,;=%:~-._\\")


TARGET_SAFE = "/?#[]@!$&'()*+,;=%:~-._\\"  # left as they are in a return target; the rest is %-encoded
ABSOLUTE_URL_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#\\@\s]*)(.*)", re.S)
HOST_NAME_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


@functools.lru_cache(maxsize=1024)
def canonical_host(host):
    """A host name as a browser looks it up: IDNA-encoded and lower case
    ('B\u00fccher.Example.com' -> 'xn--bcher-kva.example.com'); None for anything
    that is not a plain DNS name (no trailing dot, no empty label, no '%')."""
    if not host or len(host) > 253:
        return None
    try:
        name = host.encode("idna").decode("ascii").lower()
    except (UnicodeError, ValueError):
        return None
    return name if len(name) <= 253 and HOST_NAME_RE.fullmatch(name) else None


def canonical_authority(text):
    """'Example.COM:8443' -> 'example.com:8443'; None unless a host name with
    an optional port from 1 to 65535."""
    host, sep, port = text.partition(":")
    if sep and not (port.isascii() and port.isdigit() and len(port) <= 5 and 0 < int(port) < 65536):
        return None
    name = canonical_host(host)
    if name is None:
        return None
    return name + (":%d" % int(port) if sep else "")


def host_within(host, domain):
    """HOST (canonical) is DOMAIN or a name under it, compared label by label."""
    parent = canonical_host(domain.lstrip(".")) if domain else None
    if not parent:
        return False
    labels = parent.split(".")
    return host.split(".")[-len(labels):] == labels


def absolute_target(target, own_host, domain, allow_http):
    """TARGET, an absolute URL, normalised for a Location header, when it is
    https (or http when ALLOW_HTTP) and its host is OWN_HOST or lies within
    DOMAIN; else None. No user name, no backslash or space before the path."""
    match = ABSOLUTE_URL_RE.fullmatch(target) if len(target) <= 2048 else None
    if not match or match.group(3)[:1] not in ("", "/", "?", "#"):
        return None
    scheme, rest = match.group(1).lower(), match.group(3)
    if scheme != "https" and not (scheme == "http" and allow_http):
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in rest):
        return None
    authority = canonical_authority(match.group(2))
    if authority is None:
        return None
    host = authority.split(":", 1)[0]
    if host != canonical_host(own_host) and not host_within(host, domain):
        return None
    rest = rest if rest.startswith("/") else "/" + rest
    return "%s://%s%s" % (scheme, authority, urllib.parse.quote(rest, safe=TARGET_SAFE))


def is_browser(request):
    """A browser navigating, not a script or API client: no Authorization,
    and it asks for HTML."""
    return "authorization" not in request.headers and "text/html" in request.headers.get("accept", "")


class UnsupportedMediaType(ValueError):
    """A login body of a type authd does not read (415, not 400)."""


def parse_login_body(request):
    """(username, password, rd or None) from a JSON or form body; ValueError
    with a message for anything else."""
    kind = request.content_type()
    if kind == "application/json":
        try:
            data = strict_json(request.body)
        except (ValueError, UnicodeError, RecursionError):
            raise ValueError("The body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ValueError("The body must be a JSON object")
        target = None
    elif kind in ("application/x-www-form-urlencoded", ""):
        try:
            text = request.body.decode("utf-8")
            data = dict(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                                               max_num_fields=20, errors="strict"))
        except (ValueError, UnicodeError):
            raise ValueError("The form data is malformed") from None
        target = data.get("rd")
    else:
        raise UnsupportedMediaType("Content-Type must be application/x-www-form-urlencoded or application/json")
    name, password = data.get("username"), data.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name or not password:
        raise ValueError("User name and password are required")
    return name, password, target


# ---------------------------------------------------------------------------
# Pages: one stylesheet (allowed by its hash in the CSP, so no inline script
# or style attribute can run), one frame, and the bodies that go in it.
# ---------------------------------------------------------------------------

STYLE = """
:root{color-scheme:light dark;--bg:#f4f5f7;--card:#fff;--text:#1d2330;--muted:#5b6472;--line:#c9ced6;
--field:#878f9c;--accent:#2456d6;--accent-text:#fff;--error-bg:#fdecec;--error:#a4161a}
@media (prefers-color-scheme:dark){:root{--bg:#12151b;--card:#1c2029;--text:#e8ebf0;--muted:#a1a9b6;
--line:#3a4150;--field:#6b7485;--accent:#6b95ff;--accent-text:#0b0f17;--error-bg:#3b1d20;--error:#ffb3b3}}
*{box-sizing:border-box}
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;padding:24px 16px;
background:var(--bg);color:var(--text);font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{width:100%;max-width:380px;background:var(--card);border:1px solid var(--line);border-radius:12px;
padding:32px 28px;box-shadow:0 8px 24px rgba(0,0,0,.08)}
h1{font-size:1.5rem;margin:0 0 4px}
.site{margin:0 0 24px;color:var(--muted);word-break:break-all}
label{display:block;font-weight:600;margin:16px 0 6px}
input{width:100%;padding:10px 12px;font:inherit;color:inherit;background:transparent;border:1px solid var(--field);
border-radius:8px}
input:focus,button:focus{outline:3px solid var(--accent);outline-offset:2px}
button{width:100%;margin-top:24px;padding:11px;font:inherit;font-weight:600;border:0;border-radius:8px;
background:var(--accent);color:var(--accent-text);cursor:pointer}
.error{margin:0 0 8px;padding:10px 12px;border-radius:8px;background:var(--error-bg);color:var(--error)}
dl{margin:0}dt{color:var(--muted);margin-top:12px}dd{margin:0;font-weight:600;word-break:break-all}
a{color:var(--accent)}a:focus{outline:3px solid var(--accent);outline-offset:2px}.back{margin:16px 0 0;text-align:center}
a.button{display:block;margin-top:24px;padding:11px;border-radius:8px;background:var(--accent);color:var(--accent-text);
font-weight:600;text-align:center;text-decoration:none}
"""
STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode("utf-8")).digest()).decode("ascii")
PAGE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; style-src 'sha256-%s'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'" % STYLE_HASH),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
    ("X-Frame-Options", "DENY"),
]
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title} · {site}</title>
<style>{style}</style></head>
<body><main>
{body}
</main></body></html>
"""
LOGIN_PAGE = """<h1>Sign in</h1>
<p class="site">to {site}</p>
{error}<form method="post" action="{action}">
<input type="hidden" name="rd" value="{target}">
<label for="username">User name</label>
<input id="username" name="username" autocomplete="username" autocapitalize="none" spellcheck="false"
 required value="{name}"{focus_name}>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required{focus_password}>
<button type="submit">Sign in</button>
</form>"""
FORBIDDEN_PAGE = """<h1>Access denied</h1>
<p class="site">{site} · error 403</p>
<p>{who} This page needs another account, or a group that account is not in.</p>
<a class="button" href="{switch}">{label}</a>
<p class="back"><a href="{back}">Back</a></p>"""
WHOAMI_PAGE = """<h1>Signed in</h1>
<dl><dt>User</dt><dd>{name}</dd><dt>Role</dt><dd>{role}</dd><dt>Groups</dt><dd>{groups}</dd></dl>
<form method="post" action="{action}"><button type="submit">Sign out</button></form>"""


def page(site, title, body):
    return PAGE.format(title=html.escape(title), site=html.escape(site), style=STYLE, body=body).encode("utf-8")


# ---------------------------------------------------------------------------
# The app: what a request may ask and what it is told. Handlers are plain
# functions from Request to Reply; one that needs a password hash returns
# Later, and the server runs it away from the hot path.
# ---------------------------------------------------------------------------

TOKEN_CACHE_SIZE = 10000
ISSUE_SLACK = 60  # seconds a token's life may exceed AUTH_EXPIRY_DAYS (rounding, settings reloads)


class Later:
    """A handler's answer that needs a password hash: the server calls
    FUNCTION(*ARGS) on its bounded hash pool, never on the thread that
    serves the hot path, and sends the Reply it returns."""
    __slots__ = ("function", "args")

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def run(self):
        return self.function(*self.args)


@functools.lru_cache(maxsize=1024)
def parse_rules(query):
    """?group=G1,G2&user=U1,U2 from the nginx config -> (groups, names,
    unknown). An unknown parameter is logged (once per distinct query)."""
    groups, names, unknown = set(), set(), []
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if key in ("group", "groups"):
            groups.update(v for v in value.split(",") if v)
        elif key in ("user", "users"):
            names.update(v for v in value.split(",") if v)
        else:
            unknown.append(key)
    if unknown:
        log("error", "unknown rule parameter %s in %s; denying (use group= or user=)"
            % (quoted(unknown[0]), quoted(query)))
    return frozenset(groups), frozenset(names), bool(unknown)


class App:
    def __init__(self, settings, keys, store):
        self.store = store
        self.configure(settings, keys)

    def configure(self, settings, keys):
        self.settings, self.keys = settings, keys
        self.token_cache = {}
        limit, window = settings.login_rate
        old = getattr(self, "address_limits", None)
        if old is None or (old.limit, old.window) != (limit, window):
            self.address_limits = RateLimiter(limit, window)
            self.name_limits = RateLimiter(limit * NAME_LIMIT_FACTOR, window)
            # every login, successful ones too (which the two above refund):
            # one valid account must not buy unlimited password hashes
            self.hash_limits = RateLimiter(limit * NAME_LIMIT_FACTOR, window)
        p = settings.prefix
        self.routes = {
            p + "/auth": ("*", self.handle_auth),
            p + "/admin": ("*", self.handle_admin),
            p + "/login": ("GET, HEAD, POST", self.handle_login),
            p + "/logout": ("GET, HEAD, POST", self.handle_logout),
            p + "/": ("GET, HEAD", self.handle_whoami),
            p + "/logged-in": ("GET, HEAD", self.handle_whoami),
            p: ("GET, HEAD", self.handle_whoami),
            p + "/healthz": ("GET, HEAD", self.handle_health),
            p + "/forward": ("*", self.handle_forward),
            p + "/forbidden": ("*", self.handle_forbidden),
        }

    def dispatch(self, request):
        """Request -> Reply (or Later) from the route table."""
        route = self.routes.get(request.path)
        if route is None:
            return text_reply(404, "not found")
        allowed, handler = route
        if allowed != "*" and request.method not in allowed.split(", "):
            return Reply(405, headers=[("Allow", allowed)])
        return handler(request)

    # -- sessions -----------------------------------------------------------

    def session(self, request, now):
        """(user, claims) for the request's cookie, or (None, None)."""
        for token in cookie_values(request.headers.get("cookie", ""), self.settings.cookie_name):
            claims = self.token_cache.get(token)
            if claims is None:
                claims = decode_token(token, self.keys, now)
                if claims is None:
                    continue
                if len(self.token_cache) >= TOKEN_CACHE_SIZE:
                    self.token_cache = {}
                self.token_cache[token] = claims
            elif claims["exp"] <= now:
                continue
            user = self.store.users.get(claims["sub"])
            if user is None or not hmac.compare_digest(user.fingerprint, claims["pwh"]):
                continue
            max_age = self.settings.max_age_days
            if max_age and now - claims["auth_time"] > max_age * DAY:
                continue
            if claims["exp"] - claims["iat"] > self.settings.expiry_days * DAY + ISSUE_SLACK:
                continue  # not issued under this server's settings
            return user, claims
        return None, None

    def session_cookie(self, user, auth_time, now):
        token, max_age = issue_token(user, auth_time, now, self.settings, self.keys[0])
        return self.cookie_header(token, max_age)

    def cookie_header(self, value, max_age):
        s = self.settings
        parts = ["%s=%s" % (s.cookie_name, value), "Path=/", "Max-Age=%d" % max_age, "HttpOnly",
                 "SameSite=" + s.cookie_samesite]
        if s.cookie_secure:
            parts.append("Secure")
        if s.cookie_domain:
            parts.append("Domain=" + s.cookie_domain)
        return "; ".join(parts)

    def clearing_cookie(self):
        return self.cookie_header("", 0)

    # -- P/auth and P/admin (any method): the hot path ---------------------------

    def handle_auth(self, request, admin_only=False):
        now = int(time.time())
        bypass = self.settings.bypass
        if bypass and "x-auth-bypass" in request.headers and hmac.compare_digest(
                request.headers["x-auth-bypass"].encode("utf-8", "replace"), bypass.encode("utf-8")):
            return Reply(200)
        user, claims = self.session(request, now)
        if user is None:
            reply = Reply(401)
            if "cookie" in request.headers and cookie_values(request.headers["cookie"], self.settings.cookie_name):
                reply.headers.append(("Set-Cookie", self.clearing_cookie()))
            return reply
        if admin_only and not user.admin:
            return Reply(403)
        if request.query and not self.rules_allow(request.query, user):
            return Reply(403)
        reply = Reply(200, user=user)
        if now - claims["iat"] > REFRESH_AFTER:
            reply.headers.append(("Set-Cookie", self.session_cookie(user, claims["auth_time"], now)))
        elif self.settings.cache_seconds:
            reply.headers.append(("X-Accel-Expires", str(max(0, min(self.settings.cache_seconds, claims["exp"] - now)))))
        return reply

    def handle_admin(self, request):
        return self.handle_auth(request, admin_only=True)

    def rules_allow(self, query, user):
        """The rules in nginx's query: the user must be in a listed group or
        be a listed user. An unknown parameter denies, so a typo in
        nginx.conf fails closed."""
        groups, names, unknown = parse_rules(query)
        if unknown:
            return False
        if not groups and not names:
            return True
        return user.name in names or not groups.isdisjoint(user.groups)

    # -- P/forward (any method): Caddy's forward_auth, Traefik's ForwardAuth ----

    def handle_forward(self, request):
        """P/auth's answer, made fit for proxies that hand any non-2xx to the
        client as it is: 403 gets the access-denied page, and a browser that
        is not signed in a 302 to the login page instead of a bare 401."""
        answer = self.handle_auth(request)
        if isinstance(answer, Later):
            return Later(self.forward_answer, request, answer)
        return self.forward_answer(request, answer)

    def forward_answer(self, request, reply):
        if isinstance(reply, Later):
            reply = reply.run()
        if reply.status == 401:
            return self.forward_unauthorized(request, reply)
        if reply.status == 403:
            forbidden = self.forbidden_page(request)
            forbidden.headers.extend(reply.headers)
            return forbidden
        if reply.user is None and 200 <= reply.status < 300:
            # Allowed without a user (the bypass): say so, because Caddy 2.6's
            # copy_headers would otherwise hand the app its placeholder text.
            reply.headers.extend([("X-Auth-User", ""), ("X-Auth-Groups", ""), ("X-Auth-Admin", "false")])
        return reply

    def forward_unauthorized(self, request, reply):
        if not is_browser(request):
            # A Basic challenge for scripts; none for a browser's own fetch or
            # image (Sec-Fetch-Mode: only browsers send it), which would
            # otherwise pop up a password dialog.
            if "sec-fetch-mode" not in request.headers and \
                    not any(name.lower() == "www-authenticate" for name, _ in reply.headers):
                reply.headers.append(("WWW-Authenticate", 'Basic realm="%s"' % (
                    host_name(self.forwarded_host(request) or request.site_host()) or "authd").replace('"', "")))
            if not reply.body:
                reply.body, reply.content_type = b'{"status": "fail", "message": "Authentication required"}', \
                    "application/json"
            return reply
        keep = [h for h in reply.headers if h[0].lower() == "set-cookie"]  # clears a bad cookie
        location = self.login_location(self.original_url(request), self.forwarded_origin(request))
        return Reply(302, headers=keep + [("Location", location)])

    def forwarded_host(self, request):
        """The proxy's X-Forwarded-Host, canonical, when the peer is a proxy on
        this host (loopback or unix socket); else None."""
        if not is_loopback(request.peer):
            return None
        claimed = request.headers.get("x-forwarded-host", "").split(",", 1)[0].strip()
        return canonical_authority(claimed) if claimed else None

    def forwarded_origin(self, request):
        """'https://app.example.com' from a trusted proxy's X-Forwarded-Proto
        and -Host; '' when there is none (links then stay relative)."""
        host = self.forwarded_host(request)
        proto = request.headers.get("x-forwarded-proto", "").split(",", 1)[0].strip().lower()
        if host is None:
            return ""
        if proto not in ("http", "https"):
            proto = "https" if self.settings.cookie_secure else "http"
        return "%s://%s" % (proto, host)

    def original_url(self, request):
        """The URL the proxy was asked for (X-Forwarded-Uri, or nginx's
        X-Original-URI), absolute when the proxy names its host. Headers from
        a peer that is not loopback are the client's own words: then '/'."""
        if not is_loopback(request.peer):
            return "/"
        uri = request.headers.get("x-forwarded-uri") or request.headers.get("x-original-uri") or "/"
        origin = self.forwarded_origin(request)
        if not origin or not uri.startswith("/"):
            return safe_target(uri)
        return origin + urllib.parse.quote(uri.encode("latin-1", "replace"), safe=TARGET_SAFE)

    def login_location(self, target, origin=""):
        """The login page (AUTH_LOGIN_URL, else this site's), bringing the
        browser back to TARGET afterwards."""
        base = self.settings.login_url or origin + self.settings.prefix + "/login"
        if target == "/":
            return base
        return base + ("&" if "?" in base else "?") + "rd=" + urllib.parse.quote(target, safe="")

    def checked_target(self, request, target):
        """TARGET if it is a path on this site, or an absolute URL of this site
        or of a host within AUTH_COOKIE_DOMAIN; else '/'."""
        if isinstance(target, str) and target and not target.startswith("/"):
            s = self.settings
            return absolute_target(target, host_name(request.site_host()), s.cookie_domain,
                                   not s.cookie_secure) or "/"
        return safe_target(target)

    # -- login and logout ---------------------------------------------------

    def handle_login(self, request):
        """GET: the form. POST: the cheap checks here (cross-site, body, rate
        limits); the password check runs Later, on the hash pool."""
        target = self.return_target(request)
        if request.method in ("GET", "HEAD"):
            user, _ = self.session(request, int(time.time()))
            if user is not None:
                return Reply(303, headers=[("Location", target)])
            return self.login_page(request, target)
        wants_json = request.content_type() == "application/json"
        if self.cross_site(request):
            log("warning", "cross-site login refused from %s (Origin %s)"
                % (request.client_ip(), quoted(request.headers.get("origin", ""))))
            return self.login_failed(request, wants_json, 403, "Cross-site login refused", target)
        try:
            name, password, form_target = parse_login_body(request)
        except ValueError as e:
            status = 415 if isinstance(e, UnsupportedMediaType) else 400
            return self.login_failed(request, wants_json, status, str(e), target)
        if form_target is not None:
            target = self.checked_target(request, form_target)
        wait = self.count_attempt(request.client_ip(), name)
        if wait:
            log("warning", "login rate limit hit from %s user=%s" % (request.client_ip(), quoted(name)))
            reply = self.login_failed(request, wants_json, 429, "Too many attempts; try again in %d seconds" % wait,
                                      target)
            reply.headers.append(("Retry-After", str(wait)))
            return reply
        return Later(self.finish_login, request, wants_json, name, password, target)

    def count_attempt(self, address, name):
        """Count a login against every limit: the address's and the name's
        (refunded on success) and the address's hashes (never refunded: one
        valid account must not buy unlimited scrypt runs). 0 when allowed,
        else the seconds to wait."""
        key, now, counted = rate_key(address), time.time(), []
        for limiter, limit_key in ((self.address_limits, key), (self.name_limits, name[:64]),
                                   (self.hash_limits, key)):
            wait = limiter.hit(limit_key, now)
            if wait:
                for done, done_key in counted:
                    done.refund(done_key)
                return wait
            counted.append((limiter, limit_key))
        return 0

    def refund_attempt(self, address, name):
        self.address_limits.refund(rate_key(address))
        self.name_limits.refund(name[:64])

    def finish_login(self, request, wants_json, name, password, target):
        """The costly half of a login: check the password, issue the cookie."""
        address = request.client_ip()
        try:
            user = self.check_password(name, password)
        except HashBusy:
            self.refund_attempt(address, name)
            return self.busy(request, wants_json, target)
        if user is None:
            log("warning", "login failed from %s user=%s" % (address, quoted(name)))
            message = "Invalid credentials" if wants_json else "Invalid user name or password"
            return self.login_failed(request, wants_json, 401, message, target, name)
        self.refund_attempt(address, name)
        self.warn_if_cookie_will_be_dropped(request)
        log("info", "login ok from %s user=%s" % (address, quoted(user.name)))
        now = int(time.time())
        cookie = ("Set-Cookie", self.session_cookie(user, now, now))
        if wants_json:
            return Reply(200, headers=[cookie], data={"status": "ok", "user": user.name})
        return Reply(303, headers=[cookie, ("Location", target)])

    def check_password(self, name, password):
        """The user if NAME and PASSWORD match, else None. An unknown name is
        checked against a dummy hash so that it costs the same as a known one."""
        user = self.store.users.get(name) if valid_name(name) else None
        try:
            ok = verify_password(password, user.hash if user else DUMMY_HASH)
        except ValueError:
            ok = False
        if not ok or user is None:
            return None
        if is_legacy_hash(user.hash):
            try:
                user = self.store.upgrade_hash(name, password) or user
                log("info", "upgraded the password hash of %s to scrypt" % name)
            except (Failure, OSError) as e:
                log("error", "could not upgrade the password hash of %s: %s" % (name, e))
        return user

    def login_failed(self, request, wants_json, status, message, target, name=""):
        if wants_json:
            return Reply(status, data={"status": "fail", "message": message})
        return self.login_page(request, target, status=status, message=message, name=name)

    def cross_site(self, request):
        """A login posted from another site (login CSRF): Origin's host name
        differs from this site's, or the browser says cross-site."""
        if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
            return True
        origin = request.headers.get("origin")
        if origin is None:
            return False
        site = request.headers.get("x-original-host") or request.headers.get("host", "")
        try:
            origin_host = urllib.parse.urlsplit(origin).hostname
        except ValueError:
            return True
        return not origin_host or (origin_host != host_name(site) and not (
            canonical_host(origin_host) and host_within(canonical_host(origin_host), self.settings.cookie_domain)))

    def warn_if_cookie_will_be_dropped(self, request):
        if self.settings.cookie_secure and request.headers.get("x-forwarded-proto", "https").lower() == "http" \
                and host_name(request.site_host()) not in ("localhost", "127.0.0.1", "::1"):
            log("warning", "this login came over plain http, where browsers drop the Secure cookie: "
                "serve the site over https, or set AUTH_COOKIE_SECURE=false")

    def handle_logout(self, request):
        user, _ = self.session(request, int(time.time()))
        if user is not None:
            log("info", "logout from %s user=%s" % (request.client_ip(), quoted(user.name)))
        cookie = ("Set-Cookie", self.clearing_cookie())
        if request.wants_json():
            return Reply(200, headers=[cookie], data={"status": "ok"})
        return Reply(303, headers=[cookie, ("Location", self.login_location(self.return_target(request)))])

    def return_target(self, request):
        """Where to go after login: ?rd=, else nginx's X-Original-URI, else /.
        nginx's central-login redirect (`?rd=$scheme://$http_host$request_uri`)
        cannot %-encode the URL: an rd= that starts the query and holds "://"
        is that URL as it stands, its own & and = included."""
        query = request.query
        try:
            if query.startswith("rd=") and "://" in query:
                rd = query[3:]
            else:
                rd = dict(urllib.parse.parse_qsl(query, max_num_fields=20)).get("rd") if query else None
        except ValueError:
            rd = None
        if rd is None:
            rd = request.headers.get("x-original-uri")
            if rd is not None and rd.startswith(self.settings.prefix + "/"):
                rd = None  # the login page itself; nothing to return to
        return self.checked_target(request, rd or "/")

    # -- pages ----------------------------------------------------------------

    def login_page(self, request, target, status=200, message="", name=""):
        site = host_name(request.site_host()) or "this site"
        error = '<p class="error" role="alert">%s</p>' % html.escape(message) if message else ""
        body = LOGIN_PAGE.format(
            site=html.escape(site), action=html.escape(self.settings.prefix + "/login"),
            target=html.escape(target), error=error, name=html.escape(name),
            focus_name="" if name else " autofocus", focus_password=" autofocus" if name else "")
        reply = Reply(status, page=page(site, "Sign in", body))
        if not target.startswith("/"):
            # Chromium holds the login's redirect to the form-action sources
            # too: name the (checked) origin the login sends the browser to.
            origin = "%s://%s" % urllib.parse.urlsplit(target)[:2]
            reply.page_headers = False
            reply.headers.extend((name, value.replace("form-action 'self'", "form-action 'self' " + origin))
                                 for name, value in PAGE_HEADERS)
        return reply

    def handle_whoami(self, request):
        user, _ = self.session(request, int(time.time()))
        if user is None:
            return Reply(303, headers=[("Location", self.settings.prefix + "/login")])
        groups = ", ".join(user.groups) or "none"
        body = WHOAMI_PAGE.format(name=html.escape(user.name), role="an administrator" if user.admin else "a user",
                                  groups=html.escape(groups), action=html.escape(self.settings.prefix + "/logout"))
        return Reply(200, page=page(host_name(request.site_host()) or "this site", "Signed in", body))

    def handle_forbidden(self, request):
        """P/forbidden, for nginx's `error_page 403`: the access-denied page."""
        return self.forbidden_page(request)

    def forbidden_page(self, request):
        """403 in the house style: who is signed in, "sign in as someone else"
        (sign out, then log in and come back here), and "back"."""
        user, _ = self.session(request, int(time.time()))
        here = self.original_url(request)
        if user is not None:
            login = self.settings.login_url
            logout = (urllib.parse.urlsplit(login)._replace(path="", query="").geturl() if login else "") \
                + self.settings.prefix + "/logout"
            who, label = "Signed in as <strong>%s</strong>." % html.escape(user.name), "Sign in as someone else"
            switch = logout + ("" if here == "/" else "?rd=" + urllib.parse.quote(here, safe=""))
        else:
            who, label = "You are not signed in.", "Sign in"
            switch = self.login_location(here, self.forwarded_origin(request))
        back = self.back_link(request, here)
        site = host_name(self.forwarded_host(request) or request.site_host()) or "this site"
        body = FORBIDDEN_PAGE.format(site=html.escape(site), who=who, switch=html.escape(switch),
                                     label=label, back=html.escape(back))
        return Reply(403, page=page(site, "Access denied", body))

    def back_link(self, request, here):
        """The page the user came from (Referer, when it may be a return
        target), unless that is this page itself or a login page: then '/'."""
        back = self.checked_target(request, request.headers.get("referer", "/"))
        path = urllib.parse.urlsplit(back).path
        if path.startswith(self.settings.prefix + "/") or path == urllib.parse.urlsplit(here).path:
            return "/"
        return back

    def busy(self, request, wants_json=None, target=None):
        """503 when too many password checks wait already: answered at once,
        so a flood of logins costs neither a wait nor a connection held open."""
        wants_json = request.content_type() == "application/json" if wants_json is None else wants_json
        reply = self.login_failed(request, wants_json, 503, "The server is busy; try again in a moment",
                                  target or self.return_target(request))
        reply.headers.append(("Retry-After", "5"))
        return reply

    def handle_health(self, request):
        return text_reply(200, "ok")


# ---------------------------------------------------------------------------
# Server: one asyncio event loop serves every connection (Protocol and
# transport, no thread per connection: under the GIL those cost ~14 context
# switches a request). App handlers are plain functions run on the loop; a
# Later (a password hash) runs on a small thread pool, so a login never
# stalls the hot path and a flood of logins only queues behind the pool.
# ---------------------------------------------------------------------------

HASH_THREADS = 2          # threads that run Later jobs (each scrypt takes 128 MiB)
MAX_WAITING_HASHES = 16   # Later jobs queued or running; beyond: 503 at once
SWEEP_EVERY = 0.25        # seconds between checks of connection deadlines
SEND_TIMEOUT = 30.0       # seconds a client may leave a reply unread
MAX_BUFFERED = 65536      # unprocessed bytes a connection may pile up (pipelining)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def internal_error(request, error):
    """A bug costs one request, not the server."""
    log("error", "internal error on %s %s: %s: %s" % (request.method, quoted(request.path),
                                                      type(error).__name__, error))
    return Reply(500)


class Connection(asyncio.Protocol):
    """One client connection: requests parsed as bytes arrive, answered in
    order (pipelining). A request's head and body must arrive within the
    header timeout from its first byte, whatever pace the client sends at
    (slow-loris); a new connection must start one within it too."""

    def __init__(self, server):
        self.server, self.buffer, self.pending, self.length = server, b"", None, 0
        self.busy = self.closed = self.write_paused = False

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, tuple) else ""
        self.deadline = time.monotonic() + self.server.app.settings.header_timeout
        self.server.connections.add(self)

    def connection_lost(self, exc):
        self.closed = True
        self.server.forget(self)

    def pause_writing(self):
        self.write_paused = True
        self.deadline = time.monotonic() + SEND_TIMEOUT

    def resume_writing(self):
        self.write_paused = False
        self.process()

    def data_received(self, data):
        if not self.buffer and self.pending is None:
            self.deadline = time.monotonic() + self.server.app.settings.header_timeout
        self.buffer += data
        if len(self.buffer) > MAX_BUFFERED:
            self.transport.pause_reading()  # until the requests already here are answered
        self.process()

    def process(self):
        """Answer every complete request in the buffer, in order."""
        while self.buffer and not (self.busy or self.closed or self.write_paused):
            try:
                request = self.next_request()
            except HTTPError as e:
                return self.send(render_reply(text_reply(e.status, str(e)), None, True), close=True)
            if request is None:
                return
            self.answer(request)
        if not (self.busy or self.closed):
            if len(self.buffer) <= MAX_BUFFERED:
                self.transport.resume_reading()
            if not self.buffer and self.pending is None and not self.write_paused:
                self.deadline = time.monotonic() + self.server.idle_timeout()

    def next_request(self):
        """The next complete request in the buffer, or None until more bytes come."""
        if self.pending is None:
            end = self.buffer.find(b"\n\r\n")
            end2 = self.buffer.find(b"\n\n")
            end, skip = (end2, 2) if end2 >= 0 and (end < 0 or end2 < end) else (end, 3)
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise HTTPError(414 if self.buffer.find(b"\n") < 0 else 431, "request head too large")
                return None
            if end + 1 > MAX_HEAD:
                raise HTTPError(431, "request head too large")
            head, self.buffer = self.buffer[:end + 1], self.buffer[end + skip:]
            self.pending = parse_head(head)
            self.length = body_length(self.pending)
            if len(self.buffer) < self.length and self.pending.headers.get("expect", "").lower() == "100-continue":
                self.transport.write(CONTINUE)
        if len(self.buffer) < self.length:
            return None
        request, self.pending = self.pending, None
        request.body, self.buffer = self.buffer[:self.length], self.buffer[self.length:]
        return request

    def answer(self, request):
        request.peer = self.peer
        close = not request.keep_alive or self.server.draining
        try:
            reply = self.server.app.dispatch(request)
        except Exception as e:
            reply, close = internal_error(request, e), True
        if isinstance(reply, Later):
            self.server.run_later(self, request, reply, close)
        else:
            self.send(render_reply(reply, request, close), close)

    def send(self, data, close):
        self.transport.write(data)
        if close:
            self.closed = True
            self.transport.close()

    def timed_out(self):
        if self.buffer or self.pending is not None:
            self.transport.write(render_reply(text_reply(408, "request timeout"), None, True))
        self.closed = True
        self.transport.abort()


class Server:
    """The listening socket and its connections: accepts while under the
    connection cap (beyond it, clients wait in the kernel's backlog), runs
    Later jobs on the hash pool, checks deadlines, drains on stop."""

    def __init__(self, app, sock, where):
        self.app, self.sock, self.where = app, sock, where
        self.connections, self.accepted, self.waiting_hashes = set(), 0, 0
        self.draining = self.accepting = False
        self.owned_path = None  # a unix socket file to remove at exit
        self.loop = asyncio.new_event_loop()
        self.pool = concurrent.futures.ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="hash")
        sock.setblocking(False)

    def idle_timeout(self):
        """Keep-alive idle time; short when connections run low, so idle
        clients cannot hold every slot."""
        if self.accepted > self.app.settings.max_connections * 3 // 4:
            return 1.0
        return self.app.settings.idle_timeout

    def accept_while_room(self):
        while self.accepted < self.app.settings.max_connections and not self.draining:
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: try again shortly
                log("error", "cannot accept a connection: %s" % e.strerror)
                self.listen(False)
                self.loop.call_later(0.5, self.listen, True)
                return
            self.accepted += 1
            self.loop.create_task(self.connect(client))
        self.listen(False)

    async def connect(self, client):
        try:
            await self.loop.connect_accepted_socket(lambda: Connection(self), client)
        except OSError:
            client.close()
            self.forget(None)

    def listen(self, on):
        """Start or stop accepting new connections."""
        if on and not self.accepting and not self.draining:
            self.loop.add_reader(self.sock.fileno(), self.accept_while_room)
        elif not on and self.accepting:
            self.loop.remove_reader(self.sock.fileno())
        self.accepting = on and not self.draining

    def forget(self, connection):
        self.connections.discard(connection)
        self.accepted -= 1
        if not self.accepting:
            self.listen(True)

    def run_later(self, connection, request, later, close):
        """Run a Later job on the hash pool, then answer on the loop."""
        if self.waiting_hashes >= MAX_WAITING_HASHES:
            reply = self.app.busy(request)
            return connection.send(render_reply(reply, request, close), close)
        self.waiting_hashes += 1
        connection.busy = True
        job = self.loop.run_in_executor(self.pool, later.run)
        job.add_done_callback(lambda done: self.later_done(connection, request, done, close))

    def later_done(self, connection, request, job, close):
        self.waiting_hashes -= 1
        connection.busy = False
        try:
            reply = job.result()
        except Exception as e:
            reply, close = internal_error(request, e), True
        if not connection.closed:
            connection.send(render_reply(reply, request, close or self.draining), close or self.draining)
            connection.process()

    def sweep(self):
        """Close the connections whose deadline passed; every SWEEP_EVERY."""
        now = time.monotonic()
        for connection in [c for c in self.connections if c.deadline <= now and not c.busy]:
            connection.timed_out()
        self.loop.call_later(SWEEP_EVERY, self.sweep)

    def stop(self, timeout):
        """Stop accepting, close idle connections, let requests in flight
        finish (up to TIMEOUT seconds), then stop the loop."""
        self.listen(False)
        self.draining = True
        self.sock.close()  # refuse new connections now, not after the drain
        deadline = time.monotonic() + timeout

        def check():
            for connection in [c for c in self.connections if not c.busy]:
                connection.closed = True
                connection.transport.close()
            if not self.connections or time.monotonic() > deadline:
                self.loop.stop()
            else:
                self.loop.call_later(0.05, check)
        check()


def listening_socket(settings):
    """(socket, description): from systemd (LISTEN_FDS), a unix socket
    (AUTH_SOCKET) or host:port."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS", "0").isdigit() \
            and int(os.environ["LISTEN_FDS"]) >= 1:
        sock = socket.socket(fileno=3)
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
        return sock, describe(sock) + " (socket from systemd)"
    if settings.socket:
        return unix_socket(settings.socket, settings.socket_mode)
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.create_server((settings.host, settings.port), family=family, backlog=1024)
    return sock, describe(sock)


def unix_socket(path, mode):
    if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
        os.unlink(path)  # left by an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(1024)
    return sock, "unix:" + path


def describe(sock):
    if sock.family == socket.AF_UNIX:
        return "unix:%s" % sock.getsockname()
    host, port = sock.getsockname()[:2]
    return "http://%s:%d" % ("[%s]" % host if ":" in host else host, port)


def notify_systemd(message):
    """sd_notify(3): tell systemd READY=1, RELOADING=1 or STOPPING=1."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(path)
            sock.sendall(message.encode("ascii"))
    except OSError as e:
        log("warning", "could not notify systemd: %s" % e.strerror)


def run_server(server, app, args):
    """Serve until SIGTERM/SIGINT; SIGHUP reloads; the users file is looked
    at about once a second. Reloads run on a thread of their own: a plaintext
    line in the users file costs a hash."""
    loop, reloads = server.loop, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="reload")

    def reload(everything):
        if everything:
            notify_systemd("RELOADING=1\nMONOTONIC_USEC=%d" % (time.monotonic_ns() // 1000))
            reload_settings(app, args)
        reload_users(app.store)
        if everything:
            notify_systemd("READY=1")

    def watch():
        if app.store.changed():
            reloads.submit(reload, False)
        loop.call_later(1.0, watch)

    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.submit(reload, True))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_server, server)
    server.listen(True)
    loop.call_soon(server.sweep)
    loop.call_later(1.0, watch)
    log("info", "listening on %s" % server.where)
    notify_systemd("READY=1\nSTATUS=listening on %s" % server.where)
    loop.run_forever()
    return finish_server(server, reloads)


def stop_server(server):
    notify_systemd("STOPPING=1")
    log("info", "stopping: finishing requests in flight")
    server.stop(timeout=HASH_WAIT + 5)  # a login may wait HASH_WAIT for a hash slot


def finish_server(server, reloads):
    drained = not server.connections
    server.pool.shutdown(wait=False)
    reloads.shutdown(wait=False)
    if server.owned_path:
        try:
            os.unlink(server.owned_path)
        except OSError:
            pass
    log("info", "stopped" if drained else "stopped with requests still in flight")
    return 0


def reload_users(store):
    try:
        users = store.load()
        log("info", "loaded %d user(s) from %s" % (len(users), store.path))
    except (UsersFileError, Failure, OSError) as e:
        store.signature = store.file_signature()  # don't retry until the file changes again
        log("error", "kept the previous users: %s" % str(e).replace("\n", "; "))


def reload_settings(app, args):
    try:
        settings, warnings = settings_from_args(args)
        keys = load_secrets(settings)
    except Failure as e:
        log("error", "kept the previous settings: %s" % e)
        return
    for warning in warnings:
        log("warning", warning)
    for name in settings.keep_restart_only(app.settings):
        log("warning", "%s changed; restart authd to apply it" % name)
    app.configure(settings, keys)
    log("info", "reloaded settings")


# ---------------------------------------------------------------------------
# Command line: serve (the default), and the commands that edit or check the
# users file. Each edit goes through edit_users_file, so it is atomic and a
# running server picks it up by itself.
# ---------------------------------------------------------------------------

def read_password(prompt=True):
    """A new password: asked twice on a terminal, else the first line of stdin."""
    if prompt and sys.stdin is not None and sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if first != getpass.getpass("Password again: "):
            raise Failure("the passwords do not match")
        password = first
    else:
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            raise Failure("no password on standard input (give it as one line)")
        password = line.rstrip("\r\n")
    if not password:
        raise Failure("the password is empty")
    if len(password) > 1024:
        raise Failure("the password is longer than 1024 characters")
    return password


def print_problems(problems):
    for problem in problems:
        print("authd: " + problem, file=sys.stderr)


def parse_groups(text, admin):
    groups = [g for g in (text or "").split(",") if g]
    for group in groups:
        try:
            check_name(group, "group name")
        except ValueError as e:
            raise Failure(str(e)) from None
    if admin and "admin" not in groups:
        groups.insert(0, "admin")
    return groups


def command_hash(args, settings):
    print(hash_password(read_password()))


def command_adduser(args, settings):
    try:
        check_name(args.name)
    except ValueError as e:
        raise Failure(str(e)) from None
    groups = parse_groups(args.groups, args.admin)
    new_hash = hash_password(read_password())

    def add(entries, users):
        if args.name in users:
            raise Failure("user %s already exists (use 'passwd' to change the password)" % args.name)
        entries.append(User(args.name, new_hash, groups))

    edit_users_file(settings.users_file, add)
    print("added %s to %s" % (args.name, settings.users_file))


def require_user(users, name, path):
    if name not in users:
        raise Failure("no user %s in %s" % (quoted(name), path))


def command_passwd(args, settings):
    _, users = read_users_file(settings.users_file)
    require_user(users, args.name, settings.users_file)  # ask for no password that would be thrown away
    new_hash = hash_password(read_password())

    def change(entries, users):
        require_user(users, args.name, settings.users_file)
        set_hash(entries, args.name, new_hash)

    edit_users_file(settings.users_file, change)
    print("changed the password of %s" % args.name)


def command_deluser(args, settings):
    def remove(entries, users):
        require_user(users, args.name, settings.users_file)
        entries.remove(users[args.name])

    edit_users_file(settings.users_file, remove)
    print("removed %s" % args.name)


def command_users(args, settings):
    _, users = read_users_file(settings.users_file)
    for user in users.values():
        print("%s\t%s" % (user.name, ",".join(user.groups)))


def command_import_htpasswd(args, settings):
    """Merge an htpasswd file; lines keep their hashes (upgraded at login)."""
    try:
        with open(args.file, encoding="utf-8") as f:
            lines = f.read(MAX_USERS_FILE).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Failure("%s: cannot read: %s" % (args.file, getattr(e, "strerror", None) or e))
    report = {"added": [], "skipped": []}

    def merge(entries, users):
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, _, password_hash = line.partition(":")
            where = "%s line %d" % (args.file, number)
            if re.fullmatch(r"[./0-9A-Za-z]{13}", password_hash):
                report["skipped"].append("%s: %s has a DES crypt hash (htpasswd -d), which keeps only 8 characters "
                                         "of a password; add the user anew with 'authd.py adduser %s'" % (where, name, name))
                continue
            try:
                user = parse_user_line(name + ":" + password_hash)
            except ValueError as e:
                report["skipped"].append("%s: %s" % (where, e))
                continue
            if user.name in users:
                report["skipped"].append("%s: %s is already in %s" % (where, user.name, settings.users_file))
                continue
            users[user.name] = user
            entries.append(user)
            report["added"].append(user.name)

    edit_users_file(settings.users_file, merge)
    print("imported %d user(s) into %s%s" % (len(report["added"]), settings.users_file,
                                            (": " + ", ".join(report["added"])) if report["added"] else ""))
    for line in report["skipped"]:
        print("skipped " + line)


def users_file_problems(path):
    """Every problem of the users file at PATH (printing notes as it goes)."""
    try:
        _, users = read_users_file(path)
    except UsersFileError as e:
        return e.problems
    if not users:
        print("note: %s has no users yet; add one with: python3 authd.py adduser NAME" % path)
    plaintext = [u.name for u in users.values() if is_plaintext(u.hash)]
    if plaintext:
        print("note: plaintext passwords for %s will be hashed when the server starts" % ", ".join(plaintext))
    return []


def command_check(args, settings):
    problems = []
    try:
        load_secrets(settings, create=False)
    except Failure as e:
        if settings.token_secrets or os.path.exists(settings.secret_file):
            problems.append(str(e))
    problems += users_file_problems(settings.users_file)
    print_problems(problems)
    if problems:
        return 1
    print("ok: settings and %s are valid" % settings.users_file)
    return 0


def command_serve(args, settings):
    keys = load_secrets(settings)
    store = UsersStore(settings.users_file)
    store.load()
    if not store.users:
        log("warning", "no users yet: add one with: python3 authd.py adduser NAME --users %s" % settings.users_file)
    app = App(settings, keys, store)
    try:
        sock, where = listening_socket(settings)
    except OSError as e:
        raise Failure("cannot listen on %s: %s" % (settings.socket or "%s:%d" % (settings.host, settings.port),
                                                  e.strerror or e))
    allow_open_files(settings.max_connections + 64)
    server = Server(app, sock, where)
    if where == "unix:" + str(settings.socket):
        server.owned_path = settings.socket
    return run_server(server, app, args)


def allow_open_files(wanted):
    """Raise the soft limit on open files to WANTED (every connection is one)
    when the hard limit allows; a service manager may have set it already."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted or soft == resource.RLIM_INFINITY:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))
    except (ValueError, OSError):
        pass
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft < wanted:
        log("warning", "only %d files may be open, fewer than AUTH_MAX_CONNECTIONS needs; connections beyond "
            "that wait (raise LimitNOFILE= in the unit, or lower AUTH_MAX_CONNECTIONS)" % soft)


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--users", metavar="FILE", help="users file (AUTH_USERS_FILE)")
    common.add_argument("--env", metavar="FILE", help="settings file (default: .env beside authd.py)")
    parser = argparse.ArgumentParser(
        prog="authd.py", description="Login server for NGINX auth_request. With no command: serve.")
    parser.add_argument("--version", action="version", version="authd " + __version__)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", parents=[common], help="serve HTTP (the default)")
    serve.add_argument("--host", help="bind address (AUTH_HOST)")
    serve.add_argument("--port", help="TCP port (AUTH_PORT)")
    commands.add_parser("hash", parents=[common], help="print the hash of a password")
    add = commands.add_parser("adduser", parents=[common], help="add a user")
    add.add_argument("name")
    add.add_argument("--admin", action="store_true", help="put the user in the admin group")
    add.add_argument("--groups", metavar="G1,G2", help="comma-separated groups")
    passwd = commands.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    deluser = commands.add_parser("deluser", parents=[common], help="remove a user")
    deluser.add_argument("name")
    commands.add_parser("users", parents=[common], help="list users and groups (never hashes)")
    commands.add_parser("check", parents=[common], help="validate the settings and the users file")
    imp = commands.add_parser("import-htpasswd", parents=[common], help="merge an htpasswd file into the users file")
    imp.add_argument("file")
    return parser


COMMANDS = {"serve": command_serve, "hash": command_hash, "adduser": command_adduser, "passwd": command_passwd,
            "deluser": command_deluser, "users": command_users, "check": command_check,
            "import-htpasswd": command_import_htpasswd}


def settings_from_args(args):
    flags = {"AUTH_HOST": getattr(args, "host", None), "AUTH_PORT": getattr(args, "port", None),
             "AUTH_USERS_FILE": args.users}
    return load_settings(flags, env_file=args.env, env_required=args.env is not None)


# ---------------------------------------------------------------------------
# Main: parse the command line, load the settings, run the command; every
# error an operator can cause ends as one line on stderr and an exit status.
# ---------------------------------------------------------------------------

def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    try:
        try:
            settings, warnings = settings_from_args(args)
        except SettingsError as e:
            problems = list(e.problems)
            if args.command == "check" and e.values.get("AUTH_USERS_FILE"):
                problems += users_file_problems(e.values["AUTH_USERS_FILE"])  # check lists every problem
            print_problems(problems)
            return 1 if args.command == "check" else 2
        for warning in warnings:
            log("warning", warning)
        return COMMANDS[args.command](args, settings) or 0
    except UsersFileError as e:
        print_problems(e.problems)
        return 1
    except HashBusy:
        print("authd: timed out waiting to hash", file=sys.stderr)
        return 1
    except Failure as e:
        print("authd: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
