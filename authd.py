#!/usr/bin/env python3
"""authd: a login server for NGINX auth_request, in one standard-library file.

NGINX asks ``P/auth`` (P is AUTH_PREFIX, /__auth by default) on every
protected request; authd answers 200 (with X-Auth-User) when the browser holds
a valid signed session cookie, 401 when it does not. authd also serves the
login page, issues and refreshes the cookie, and logs out. Users live in a
plain text file. See README.md.

The file reads in the order data flows, one banner per section:
logging -> counting -> settings -> password hashes -> users file -> tokens ->
API clients -> two-factor codes -> rate limits -> request and reply -> QR codes ->
pages -> app -> metrics -> server -> command line -> main. To serve, main
re-runs this file once in the same process (os.execv, its code in a pipe): the only
exec authd does, explained at the end.
"""

import argparse
import asyncio
import base64
import binascii
import bisect
import concurrent.futures
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import gc
import getpass
import hashlib
import hmac
import html
import ipaddress
import itertools
import json
import marshal
import os
import re
import resource
import secrets
import shlex
import signal
import socket
import stat
import sys
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


class UnsafeFile(Failure):
    """A file authd trusts (lock, temporary, secret) is a link or not a file."""


def open_regular_file(path, flags, mode=0o600):
    """os.open that accepts only a regular file with a single name. The
    service user may write the folder of its files; root running the command
    line must not follow a link planted there onto another file (O_NOFOLLOW
    refuses a symbolic link, the name count a hard link to /etc/passwd), nor
    hang on a planted FIFO (O_NONBLOCK, then fstat)."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile("%s is a symbolic link; authd does not follow it there (remove it)" % path) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise UnsafeFile("%s is %s; authd refuses it (remove it)" % (
            path, "a hard link" if stat.S_ISREG(st.st_mode) else "not a regular file"))
    return fd


# ---------------------------------------------------------------------------
# Counting, for the metrics page: counters that lose nothing under threads
# and take no lock on the hot path, and a histogram of the (rare, costly)
# password hashes.
# ---------------------------------------------------------------------------

class Counts:
    """Counts by label. Each thread adds to a dict of its own (one writer per
    dict: no lock and no lost update); a scrape sums the dicts, folding those
    of finished threads into one total so that they do not pile up."""

    def __init__(self, labels):
        self.labels = tuple(labels)
        self.local = threading.local()
        self.parts = []                           # (thread, its counts)
        self.finished = dict.fromkeys(self.labels, 0)
        self.lock = threading.Lock()

    def add(self, label):
        try:
            counts = self.local.counts
        except AttributeError:
            counts = self._own()
        counts[label] += 1

    def _own(self):
        counts = dict.fromkeys(self.labels, 0)    # fixed keys: never resized while a scrape reads it
        with self.lock:
            self._fold()
            self.parts.append((threading.current_thread(), counts))
        self.local.counts = counts
        return counts

    def _fold(self):
        live = []
        for thread, counts in self.parts:
            if thread.is_alive():
                live.append((thread, counts))
            else:  # it will never write again
                for label, n in counts.items():
                    self.finished[label] += n
        self.parts = live

    def totals(self):
        with self.lock:
            self._fold()
            return {label: self.finished[label] + sum(c[label] for _, c in self.parts) for label in self.labels}


class Histogram:
    """Durations in seconds, in cumulative buckets as Prometheus reads them.
    A lock is fine here: it counts password hashes, which take far longer."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.buckets = [0] * (len(self.bounds) + 1)   # the last one is +Inf
        self.sum, self.count = 0.0, 0
        self.lock = threading.Lock()

    def observe(self, seconds):
        with self.lock:
            self.buckets[bisect.bisect_left(self.bounds, seconds)] += 1
            self.sum += seconds
            self.count += 1

    def snapshot(self):
        """(cumulative counts per bound and +Inf, sum, count)."""
        with self.lock:
            return list(itertools.accumulate(self.buckets)), self.sum, self.count


AUTH_COUNTS = Counts(("allow", "deny", "forbidden", "bypass", "basic", "token"))   # P/auth, P/admin answers
LOGIN_COUNTS = Counts(("ok", "fail", "rate-limited", "busy", "cross-site", "two-factor"))
RELOAD_COUNTS = Counts(("ok", "error"))                                            # of the users file
HASH_TIMES = Histogram((0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
STARTED = time.time()


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


def bypass_value(value):
    """AUTH_BYPASS: unset, or at least 32 characters (it opens every page)."""
    if not value:
        return None
    if len(value) < 32:
        raise ValueError("must be at least 32 characters (it has %d); %s" % (len(value), SECRET_HINT))
    return value


def secret_list(value):
    """One or more HMAC keys, separated by commas or white space."""
    keys = [k for k in re.split(r"[,\s]+", value) if k]
    if not keys:
        return None
    for key in keys:
        if len(key) < 32:
            raise ValueError("each secret must be at least 32 characters (one has %d): a shorter key can be guessed "
                             "offline from any token it signed, and whoever guesses it can sign in as anyone. "
                             "Sessions do not carry over from another server anyway, so a new key costs nothing; %s"
                             % (len(key), SECRET_HINT))
    return keys


def cookie_overrides(value):
    """AUTH_COOKIE_OVERRIDES, the upstream Express project's JSON object of
    cookie options -> {"domain": ..., "sameSite": ..., other keys: None}."""
    if not value.strip():
        return None
    try:
        options = strict_json(value.encode("utf-8"))
    except (ValueError, UnicodeError, RecursionError):
        raise ValueError("must be a JSON object, such as {\"sameSite\": \"strict\"}") from None
    if not isinstance(options, dict):
        raise ValueError("must be a JSON object, such as {\"sameSite\": \"strict\"}")
    result = dict.fromkeys(options)
    if "domain" in options:
        result["domain"] = SETTINGS["AUTH_COOKIE_DOMAIN"].parse(str(options["domain"]))
    if "sameSite" in options:
        same_site = options["sameSite"]
        if same_site is True:  # what Express means by true
            same_site = "Strict"
        if not isinstance(same_site, str):
            raise ValueError("sameSite must be \"strict\", \"lax\" or \"none\"")
        result["sameSite"] = SETTINGS["AUTH_COOKIE_SAMESITE"].parse(same_site)
    return result


def apply_cookie_overrides(values, given, warnings):
    """AUTH_COOKIE_OVERRIDES' domain and sameSite stand for AUTH_COOKIE_DOMAIN
    and AUTH_COOKIE_SAMESITE where those are not set; other keys have no
    meaning here, and are named in a warning."""
    overrides = values.get("AUTH_COOKIE_OVERRIDES") or {}
    for key, name in (("domain", "AUTH_COOKIE_DOMAIN"), ("sameSite", "AUTH_COOKIE_SAMESITE")):
        if key in overrides and name not in given:
            values[name] = overrides[key]
    ignored = [key for key in overrides if key not in ("domain", "sameSite")]
    if ignored:
        warnings.append("AUTH_COOKIE_OVERRIDES: ignored %s (authd takes domain and sameSite from it; its cookie is "
                        "always HttpOnly with Path=/, its life is AUTH_EXPIRY_DAYS, and Secure is "
                        "AUTH_COOKIE_SECURE)" % ", ".join(quoted(key) for key in ignored))


def group_names(value):
    """Group names separated by commas or white space, as a set."""
    names = frozenset(name for name in re.split(r"[,\s]+", value) if name)
    for name in names:
        if not NAME_RE.fullmatch(name):
            raise ValueError("%s is not a group name (no ':', ',', spaces or control characters)" % quoted(name))
    return names


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
    "AUTH_TOKENS_FILE": Setting("", optional, "tokens_file", False),
    "AUTH_BYPASS": Setting("", bypass_value, "bypass", True),
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
    "AUTH_PREFIX": Setting("/__auth", matching(r"(/[A-Za-z0-9._~-]+)*", "must be a path such as /__auth (no "
                                               "trailing slash), or empty for the root"), "prefix", False),
    "AUTH_PASSWORD": Setting("", optional, "password", True),
    "AUTH_COOKIE_OVERRIDES": Setting("", cookie_overrides, "cookie_overrides", True),
    "AUTH_LOGIN_RATE": Setting("15/900", login_rate, "login_rate", True),
    "AUTH_MAX_CONNECTIONS": Setting("10000", whole_number(1, 1000000), "max_connections", False),
    "AUTH_CACHE_SECONDS": Setting("0", whole_number(0, 3600, "seconds"), "cache_seconds", True),
    "AUTH_IDLE_TIMEOUT": Setting("75", real_number("seconds", "75", DAY), "idle_timeout", True),
    "AUTH_HEADER_TIMEOUT": Setting("10", real_number("seconds", "10", DAY), "header_timeout", True),
    "AUTH_TOTP_GROUPS": Setting("", group_names, "totp_groups", True),
    "AUTH_TOTP_ISSUER": Setting("", matching(r"[^\x00-\x1f\x7f]{0,100}", "must be at most 100 characters, "
                                             "no control characters", optional), "totp_issuer", True),
}
SECRET_SETTINGS = ("AUTH_TOKEN_SECRET", "AUTH_BYPASS", "AUTH_PASSWORD")  # never echoed in a message


class Settings:
    """The checked settings, as attributes named in SETTINGS."""

    def __init__(self, values):
        for name, setting in SETTINGS.items():
            setattr(self, setting.attribute, values[name])
        folder = os.path.dirname(os.path.abspath(self.users_file))
        if self.secret_file is None:
            self.secret_file = os.path.join(folder, ".authd_secret")
        if self.tokens_file is None:
            self.tokens_file = os.path.join(folder, "tokens.txt")

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
    def __init__(self, problems, values=None, warnings=()):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.values = values or {}  # the settings that did parse (check still reads the users file)
        self.warnings = list(warnings)  # listed along with the problems


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
    values, problems, given = {}, [], set()
    for name, setting in SETTINGS.items():
        source = next((source for source in (flags, environ, file_values) if source.get(name) is not None), None)
        raw = setting.default if source is None else source[name]
        given.update([name] if source is not None else [])
        try:
            values[name] = setting.parse(str(raw))
        except ValueError as e:
            problems.append("%s: %s (got %r)" % (name, e, "..." if name in SECRET_SETTINGS else raw))
    apply_cookie_overrides(values, given, warnings)
    if values.get("AUTH_COOKIE_SAMESITE") == "None" and values.get("AUTH_COOKIE_SECURE") is False:
        problems.append("AUTH_COOKIE_SAMESITE: None needs AUTH_COOKIE_SECURE=true (browsers refuse it otherwise)")
    if problems:
        raise SettingsError(problems, values, warnings)
    return Settings(values), warnings


def create_secret_file(path):
    """A new random secret, written to PATH (mode 0600); None when another
    process made the file first."""
    text = secrets.token_urlsafe(48)
    try:
        fd = open_regular_file(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        return None
    except OSError as e:
        raise Failure("%s: cannot create the secret file: %s (set AUTH_SECRET_FILE or AUTH_TOKEN_SECRET)"
                      % (path, e.strerror))
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    log("info", "created a new secret in %s" % path)
    return text


def load_secrets(settings, create=True):
    """The HMAC keys: AUTH_TOKEN_SECRET, else the secret file (made on first start)."""
    if settings.token_secrets:
        return [k.encode("utf-8") for k in settings.token_secrets]
    path = settings.secret_file
    try:
        with os.fdopen(open_regular_file(path, os.O_RDONLY), encoding="utf-8") as f:
            text = f.read(65536)
    except FileNotFoundError:
        if not create:
            raise Failure("%s: no secret file yet (authd creates it on first start)" % path)
        text = create_secret_file(path)
        if text is None:
            return load_secrets(settings, create=False)  # another process just made it
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
BCRYPT_RE = re.compile(r"\$2[aby]\$[0-3][0-9]\$[./A-Za-z0-9]{53}")  # cost, 22 characters of salt, 31 of hash
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
        self.started = time.perf_counter()

    def __exit__(self, *exc):
        HASH_TIMES.observe(time.perf_counter() - self.started)
        HASH_SLOTS.release()


def scrypt(password, salt, n, r, p, length):
    memory = 128 * r * (n + p + 2) + (1 << 20)
    with hash_slot():
        return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=memory, dklen=length)


def hash_password(password, salt=None):
    salt = salt or secrets.token_bytes(16)
    checksum = scrypt(password.encode("utf-8"), salt, 2 ** SCRYPT_LN, SCRYPT_R, SCRYPT_P, 32)
    return "$scrypt$ln=%d,r=%d,p=%d$%s$%s" % (SCRYPT_LN, SCRYPT_R, SCRYPT_P, _b64_encode(salt), _b64_encode(checksum))


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
        if not re.fullmatch(r"\$[0-9a-z]{1,2}\$[./0-9A-Za-z$=,]{8,200}", value) or (
                prefix.startswith("$2") and not BCRYPT_RE.fullmatch(value)):
            raise ValueError("malformed %s hash" % ("%s bcrypt" % prefix if prefix.startswith("$2") else prefix))
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
# Users file: "name:hash" or "name:hash:group1,group2" per line, # comments;
# a fourth field holds the user's two-factor secret ("name:hash:groups:SECRET",
# "name:hash::SECRET" without groups).
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


# How a session was signed in (RFC 8176 "amr" values), in its token and in
# X-Auth-Amr. A user with two-factor has only sessions that passed the code
# step: enrolling or removing changes the fingerprint, which ends the others.
AMR_PASSWORD = ("pwd",)
AMR_TWO_FACTOR = ("pwd", "otp")


class User:
    __slots__ = ("name", "hash", "groups", "admin", "totp", "amr", "fingerprint", "allow_headers", "allow_response")

    def __init__(self, name, password_hash, groups, totp=None):
        self.name = name
        self.hash = password_hash
        self.groups = tuple(groups)
        self.admin = "admin" in self.groups
        self.totp = totp or None  # the base32 two-factor secret
        self.amr = AMR_TWO_FACTOR if self.totp else AMR_PASSWORD
        # Tokens carry this fingerprint of the stored hash (and two-factor
        # secret), so a new password (a new salt, a new hash) or a two-factor
        # change invalidates every older token. Without two-factor it is what
        # it was before two-factor existed, so an upgrade ends no session.
        material = password_hash + (":" + self.totp if self.totp else "")
        self.fingerprint = base64.urlsafe_b64encode(
            hashlib.sha256(material.encode("utf-8")).digest()[:9]).decode("ascii")
        # The hot path sends these bytes as they are.
        self.allow_headers = ("X-Auth-User: %s\r\nX-Auth-Groups: %s\r\nX-Auth-Admin: %s\r\nX-Auth-Amr: %s\r\n" % (
            name, ",".join(self.groups), "true" if self.admin else "false", ",".join(self.amr))).encode("utf-8")
        self.allow_response = (b"HTTP/1.1 200 OK\r\nCache-Control: no-store\r\n" + self.allow_headers
                               + b"Content-Length: 0\r\n\r\n")

    def line(self):
        fields = [self.name, self.hash]
        if self.groups or self.totp:
            fields.append(",".join(self.groups))
        if self.totp:
            fields.append(self.totp)
        return ":".join(fields)


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
    if len(fields) > 4:
        raise ValueError("too many ':' (expected name:hash, name:hash:groups or name:hash:groups:TOTPSECRET)")
    name, password_hash = fields[0], fields[1]
    check_name(name)
    if is_plaintext(password_hash):
        password_hash = password_hash.rstrip(" \t")  # an editor's leftover (plaintext_warnings says so)
    if not password_hash:
        raise ValueError("user %s has an empty password" % name)
    groups = fields[2].split(",") if len(fields) >= 3 and fields[2] else []
    for group in groups:
        check_name(group, "group name")
    if not is_plaintext(password_hash):
        check_hash_format(password_hash)
    totp = fields[3] if len(fields) == 4 and fields[3] else None
    if totp:
        try:
            totp_key(totp)
        except ValueError:
            raise ValueError("user %s: the two-factor secret (4th field) is not base32 of 80 bits or more"
                             % name) from None
    return User(name, password_hash, groups, totp)


def parse_lines(text, path, parse_line, keys, repeated):
    """A file's lines -> entries, in order: a str for comments and blanks,
    what PARSE_LINE made of the others. An item whose KEYS match an earlier
    one's is a problem that REPEATED(item, first line) describes. Raises
    UsersFileError listing every bad line."""
    entries, first_seen, problems = [], {}, []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            item = parse_line(line)
        except ValueError as e:
            problems.append("%s line %d: %s" % (path, number, e))
            continue
        if item is None:
            entries.append(line)
            continue
        earlier = [first_seen[key] for key in keys(item) if key in first_seen]
        if earlier:
            problems.append("%s line %d: %s" % (path, number, repeated(item, earlier[0])))
            continue
        first_seen.update(dict.fromkeys(keys(item), number))
        entries.append(item)
    if problems:
        raise UsersFileError(problems)
    return entries


def parse_users_text(text, path):
    """The whole file -> (entries, users by name)."""
    entries = parse_lines(text, path, parse_user_line, lambda user: (user.name,),
                          lambda user, first: "user %s is already on line %d" % (user.name, first))
    return entries, {user.name: user for user in entries if isinstance(user, User)}


def read_users_file(path, parse=parse_users_text):
    """(entries, users) of the users file (or, with PARSE, another file
    read with its bounds and checks); an absent file has none."""
    text = read_users_text(path)
    return parse(text, path) if text is not None else ([], {})


def read_users_text(path):
    """The users file's text, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_USERS_FILE + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UsersFileError(["%s: cannot read: %s" % (path, e.strerror)])
    if len(data) > MAX_USERS_FILE:
        raise UsersFileError(["%s: larger than %d MiB" % (path, MAX_USERS_FILE >> 20)])
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UsersFileError(["%s: not UTF-8 text (byte %d)" % (path, e.start)])


DES_RE = re.compile(r"[./0-9A-Za-z]{13}")  # htpasswd -d


def plaintext_warnings(text, path):
    """What a plaintext password line may not mean as typed: white space at
    its end (removed), or a DES hash pasted from htpasswd (taken as the
    password itself)."""
    warnings = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split(":")
        if line.lstrip().startswith("#") or len(fields) < 2 or not is_plaintext(fields[1]):
            continue
        where, name, password = "%s line %d" % (path, number), fields[0], fields[1]
        if password != password.rstrip(" \t"):
            warnings.append("%s: the plaintext password of %s ends in white space, which authd removes"
                            % (where, name))
        if DES_RE.fullmatch(password):
            warnings.append("%s: the password of %s looks like a DES hash from htpasswd, but authd takes it as a "
                            "plaintext password; import htpasswd files with 'authd.py import-htpasswd FILE', or set "
                            "the password with 'authd.py passwd %s'" % (where, name, name))
    return warnings


def render_users(entries):
    """The lines of a users or tokens file: comments and blanks as they were."""
    return "".join((e if isinstance(e, str) else e.line()) + "\n" for e in entries)


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
            self.fd = open_regular_file(self.path, os.O_RDWR | os.O_CREAT)
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
    temp = os.path.join(folder, prefix + secrets.token_hex(8))
    fd = open_regular_file(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # a new file, never a planted one
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


def edit_users_file(path, change, read=read_users_file):
    """Lock, read, call change(entries, users) -> message, write back
    atomically (only if something changed), return the message. The tokens
    file is edited the same way, with its own READ."""
    with UsersFileLock(path):
        remove_stale_temp_files(path)
        entries, users = read(path)
        before = render_users(entries)
        message = change(entries, users)
        after = render_users(entries)
        if after != before:
            write_file_atomically(path, after)
        return message


def set_user(entries, name, **changes):
    """Change the hash or the two-factor secret (None removes it) of user
    NAME in ENTRIES (a users file being edited)."""
    for i, entry in enumerate(entries):
        if isinstance(entry, User) and entry.name == name:
            entries[i] = User(name, changes.get("hash", entry.hash), entry.groups, changes.get("totp", entry.totp))
            return
    raise KeyError(name)


def hash_plaintext_lines(path):
    """Replace plaintext passwords in the users file with scrypt hashes.
    Returns the names that were converted."""
    def convert(entries, users):
        names = [u.name for u in users.values() if is_plaintext(u.hash)]
        for name in names:
            set_user(entries, name, hash=hash_password(users[name].hash))
        return names

    return edit_users_file(path, convert)


class UsersStore:
    """The users the server answers from. Readers take self.users without a
    lock: a reload swaps the whole dict at once."""

    def __init__(self, path):
        self.path = path
        self.users = {}            # what the server answers from: file_users, or AUTH_PASSWORD's user
        self.file_users = {}
        self.password_user = None  # AUTH_PASSWORD as the user "user" (the upstream project's way)
        self.mode = None
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
            for warning in plaintext_warnings(read_users_text(self.path) or "", self.path):
                log("warning", warning)
            names = hash_plaintext_lines(self.path)
            log("info", "hashed the plaintext passwords of %s in %s" % (", ".join(names), self.path))
            signature = self.file_signature()
            _, users = read_users_file(self.path)
        self.file_users, self.signature = users, signature
        self.publish()
        return self.users

    def set_password_user(self, user):
        self.password_user = user
        self.publish()

    def in_password_mode(self):
        return self.users is not self.file_users

    def publish(self):
        """self.users: the file's users; while it has none, AUTH_PASSWORD's
        user. Says so when that changes."""
        if self.file_users or self.password_user is None:
            self.users = self.file_users
        else:
            self.users = {self.password_user.name: self.password_user}
        mode = "password" if self.in_password_mode() else "ignored" if self.password_user else "file"
        if mode != self.mode and mode != "file":
            log("warning", password_mode_message(mode == "password", self.path))
        self.mode = mode

    def changed(self):
        return self.file_signature() != self.signature

    def upgrade_hash(self, name, password, verified_hash):
        """After a login with a legacy hash: store a new scrypt hash, but only
        if the line still holds VERIFIED_HASH (compare and swap under the
        lock). A passwd or deluser that landed since the login checked the
        password wins; overwriting it would bring the old password back.
        Returns the upgraded User, or None when the line had changed."""
        new_hash = hash_password(password)

        def swap(entries, users):
            if name not in users or users[name].hash != verified_hash:
                return False
            set_user(entries, name, hash=new_hash)
            return True

        if not edit_users_file(self.path, swap):
            return None
        self.load()
        return self.users.get(name)


PASSWORD_USER = "user"  # the upstream project's name for the one AUTH_PASSWORD user


def password_mode_message(active, path):
    if active:
        return ("AUTH_PASSWORD is the one user %s while %s has no users, as in the upstream auth-server; to name "
                "your users instead: %s, then remove AUTH_PASSWORD"
                % (quoted(PASSWORD_USER), path, adduser_command(path)))
    return "AUTH_PASSWORD is ignored: %s has users (remove it from the settings)" % path


@functools.lru_cache(maxsize=2)
def password_user(password, key):
    """AUTH_PASSWORD as a User. The salt comes from KEY (the oldest signing
    key), so the hash, and with it every session, outlives a restart, and a
    new AUTH_PASSWORD ends them as a new password would."""
    salt = hmac.new(key, b"authd AUTH_PASSWORD salt", hashlib.sha256).digest()[:16]
    return User(PASSWORD_USER, hash_password(password, salt), ())


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
    claims = {"sub": user.name, "iat": now, "exp": exp, "auth_time": auth_time, "pwh": user.fingerprint,
              "amr": list(user.amr)}
    return sign_token(claims, key), exp - now


# ---------------------------------------------------------------------------
# API clients: HTTP Basic and app tokens. A verified name and password pair is
# remembered for a few minutes under a keyed hash (never the password), so a
# script's next request costs no password hash. App tokens are stored only as
# SHA-256 digests in a tokens file beside the users file: checking one costs
# one SHA-256 and a lookup.
# ---------------------------------------------------------------------------

APP_TOKEN_PREFIX = "authd_"                            # lets secret scanners spot a leaked token
APP_TOKEN_RE = re.compile(r"authd_[A-Za-z0-9_-]{43}")  # 256 random bits in base64url
TOKEN_LABEL_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_BASIC = 4096                                       # characters of base64 in a Basic header
MAX_PASSWORD = 1024                                    # as the command line allows
CHALLENGE = 'Basic realm="authd", charset="UTF-8"'
NO_CREDENTIALS = (None, None, None)
TOKENS_HEADER = ("# authd app tokens; edit them with: authd.py token add|list|revoke. One a line:\n"
                 "# owner:label:sha256 of the token:created:expires (0 = never):password fingerprint\n"
                 "# (times in seconds since 1970, UTC). The tokens themselves are never stored.")


def new_app_token():
    return APP_TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token):
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def parse_authorization(value):
    """An Authorization header -> ("token", name or None, token),
    ("basic", name, password), or NO_CREDENTIALS. Anything malformed stops
    here, before it can cost a hash."""
    scheme, _, rest = value.partition(" ")
    scheme, rest = scheme.lower(), rest.strip(" ")
    if scheme == "bearer":
        return ("token", None, rest) if APP_TOKEN_RE.fullmatch(rest) else NO_CREDENTIALS
    if scheme != "basic" or len(rest) > MAX_BASIC:
        return NO_CREDENTIALS
    try:
        name, colon, password = base64.b64decode(rest, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, ValueError):  # bad base64, non-ASCII text, not UTF-8
        return NO_CREDENTIALS
    if not colon or not valid_name(name) or not 0 < len(password) <= MAX_PASSWORD:
        return NO_CREDENTIALS
    if APP_TOKEN_RE.fullmatch(password):  # clients that speak only Basic send a token as the password
        return "token", name, password
    return "basic", name, password


def has_two_factor(user):
    return user is not None and bool(getattr(user, "totp", None))


def is_api_client(request):
    """Not a browser: it sent Authorization, or it asks for no HTML and has
    none of a browser's marks (Sec-Fetch-* headers, a Mozilla/ User-Agent).
    Such a client is told how to authenticate (WWW-Authenticate); a browser
    never is, so it never pops its Basic dialog. No Accept at all counts as
    a browser, as it always has."""
    headers = request.headers
    if "authorization" in headers:
        return True
    accept = headers.get("accept")
    if accept is None or "text/html" in accept.lower() or "sec-fetch-mode" in headers or "sec-fetch-dest" in headers:
        return False
    return not headers.get("user-agent", "").startswith("Mozilla/")


class PairCache:
    """Verified Basic pairs: a keyed hash of the Authorization header, under
    a key made at start-up -> (expiry, (name, the user's line when
    verified)). Neither the password nor anything that could be attacked
    offline is kept. Keyed BLAKE2b is a MAC by design and costs a third of
    an HMAC-SHA256 here, and hashing the header as it came spares a cached
    client the decoding. Bounded (oldest out first) and time-limited; a
    changed line no longer matches."""

    def __init__(self, size=10000, ttl=300):
        self.size, self.ttl = size, ttl
        self.secret = secrets.token_bytes(32)
        self.entries = OrderedDict()
        self.lock = threading.Lock()

    def key(self, authorization):
        return hashlib.blake2b(authorization.encode("latin-1"), key=self.secret, digest_size=32).digest()

    def get(self, key, now):
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            self.entries.pop(key, None)
            return None
        return entry[1]

    def put(self, key, value, now):
        with self.lock:
            self.entries.pop(key, None)
            self.entries[key] = (now + self.ttl, value)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)

    def clear(self):
        with self.lock:
            self.entries.clear()

    def __len__(self):
        return len(self.entries)


class AppToken:
    __slots__ = ("owner", "label", "digest", "created", "expires", "fingerprint")

    def __init__(self, owner, label, digest, created, expires, fingerprint):
        self.owner, self.label, self.digest = owner, label, digest
        self.created, self.expires, self.fingerprint = created, expires, fingerprint

    def line(self):
        return "%s:%s:%s:%d:%d:%s" % (self.owner, self.label, self.digest, self.created, self.expires,
                                      self.fingerprint)

    def status(self, users, now):
        """Why the server would refuse it, or "active"."""
        user = users.get(self.owner)
        if user is None:
            return "revoked (the user is gone)"
        if not hmac.compare_digest(user.fingerprint, self.fingerprint):
            return "revoked (the password changed)"
        return "expired" if self.expires and self.expires <= now else "active"


def parse_token_line(line):
    """One tokens-file line -> AppToken, None (comment or blank), or ValueError."""
    if not line.strip() or line.lstrip().startswith("#"):
        return None
    fields = line.split(":")
    if len(fields) != 6:
        raise ValueError("expected owner:label:sha256:created:expires:fingerprint")
    owner, label, digest, created, expires, fingerprint = fields
    check_name(owner, "owner name")
    if not TOKEN_LABEL_RE.fullmatch(label):
        raise ValueError("bad label %s: 1 to 64 letters, digits, '.', '_' or '-'" % quoted(label))
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise ValueError("the third field must be a SHA-256 in 64 hex digits")
    if not re.fullmatch(r"\d{1,12}", created) or not re.fullmatch(r"\d{1,12}", expires):
        raise ValueError("the times must be whole seconds")
    if not re.fullmatch(r"[A-Za-z0-9_=-]{1,64}", fingerprint):
        raise ValueError("malformed password fingerprint")
    return AppToken(owner, label, digest, int(created), int(expires), fingerprint)


def parse_tokens_text(text, path):
    """-> (entries, tokens by digest); UsersFileError lists every bad line."""
    entries = parse_lines(text, path, parse_token_line, lambda token: (token.digest, (token.owner, token.label)),
                          lambda token, _: "a second line for token %s of %s" % (token.label, token.owner))
    return entries, {token.digest: token for token in entries if isinstance(token, AppToken)}


read_tokens_file = functools.partial(read_users_file, parse=parse_tokens_text)


def rebind_tokens(path, name, old, new):
    """A legacy hash was upgraded (same password, new hash): keep the user's
    tokens, which are bound to the hash's fingerprint, valid."""
    def change(entries, tokens):
        for token in tokens.values():
            if token.owner == name and token.fingerprint == old:
                token.fingerprint = new

    if os.path.exists(path):
        edit_users_file(path, change, read_tokens_file)


class TokensStore:
    """The app tokens the server answers from, by digest. Reloaded like the
    users store (the same signature check); a reload swaps the whole dict."""

    file_signature = UsersStore.file_signature
    changed = UsersStore.changed

    def __init__(self, path):
        self.path = path
        self.tokens = {}
        self.signature = None

    def load(self):
        signature = self.file_signature()
        _, tokens = read_tokens_file(self.path)
        self.tokens, self.signature = tokens, signature
        return tokens

    def find(self, token, name, users, now):
        """The user TOKEN stands for, or None: unknown, expired, NAME given
        and not its owner, or its owner deleted or with a new password."""
        entry = self.tokens.get(token_digest(token))
        if entry is None or (entry.expires and entry.expires <= now) or name not in (None, entry.owner):
            return None
        user = users.get(entry.owner)
        if user is None or not hmac.compare_digest(user.fingerprint, entry.fingerprint):
            return None
        return user


# ---------------------------------------------------------------------------
# Two-factor codes: RFC 6238 TOTP with the parameters every authenticator app
# assumes (HMAC-SHA-1, 6 digits, 30-second steps). The caller keeps the last
# accepted step per user, so that a code cannot be used twice.
# ---------------------------------------------------------------------------

TOTP_DIGITS = 6
TOTP_PERIOD = 30
TOTP_WINDOW = 1  # steps either side of the current one, for clock drift and typing time
TOTP_ISSUER_DEFAULT = "authd"


def new_totp_secret():
    """160 random bits (RFC 4226's recommended key size) as base32 without padding."""
    return base64.b32encode(secrets.token_bytes(20)).decode("ascii")


def totp_key(secret):
    """The key bytes of a base32 secret; spaces and lower case are tolerated, as apps show them.

    Raises ValueError for anything that is not base32 of at least 80 bits.
    """
    text = secret.replace(" ", "").upper().rstrip("=")
    if not text or len(text) % 8 in (1, 3, 6):
        raise ValueError("not a base32 secret")
    try:
        key = base64.b32decode(text + "=" * (-len(text) % 8))
    except (ValueError, TypeError):
        raise ValueError("not a base32 secret") from None
    if len(key) < 10:
        raise ValueError("a two-factor secret needs at least 80 bits")
    return key


def totp_step(now):
    return int(now) // TOTP_PERIOD


def totp_code(key, step):
    """The code for one 30-second step: HOTP (RFC 4226) with the step as counter."""
    digest = hmac.new(key, step.to_bytes(8, "big"), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F  # "dynamic truncation"
    number = int.from_bytes(digest[offset:offset + 4], "big") & 0x7FFFFFFF
    return str(number % 10 ** TOTP_DIGITS).zfill(TOTP_DIGITS)


def totp_verify(key, code, now):
    """The step whose code matches, or None.

    Every step of the window is computed and compared in constant time, with no
    early exit, so the time taken does not tell which step (if any) matched.
    The caller refuses a step it has accepted before (replay).
    """
    code = code.strip().replace(" ", "") if isinstance(code, str) else ""
    if len(code) != TOTP_DIGITS or not code.isascii() or not code.isdigit():
        return None
    current = totp_step(now)
    matched = None
    for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
        if hmac.compare_digest(totp_code(key, step), code):
            matched = step
    return matched


def totp_uri(secret, account, issuer):
    """The otpauth:// URI (Google's "Key Uri Format") that authenticator apps scan.

    The label is ISSUER:ACCOUNT with a literal colon between them; a colon,
    space or any non-ASCII character inside either is percent-encoded (UTF-8),
    so the label splits back exactly. The issuer is repeated as a parameter,
    which apps prefer over the label.
    """
    label = "%s:%s" % (urllib.parse.quote(issuer, safe=""), urllib.parse.quote(account, safe=""))
    query = urllib.parse.urlencode(
        [("secret", secret), ("issuer", issuer), ("algorithm", "SHA1"),
         ("digits", str(TOTP_DIGITS)), ("period", str(TOTP_PERIOD))],
        quote_via=urllib.parse.quote)  # %20 for a space: some apps show a "+" literally
    return "otpauth://totp/%s?%s" % (label, query)


# A pending second step: after a correct password, the browser holds a signed
# value (never a server-side session) naming the user, the fingerprint of
# their line, when the password was typed and an expiry. An enrolment step
# also carries the new secret, which the same page shows anyway.
STEP_SECONDS = 300      # a pending second step lasts 5 minutes
STEP_CODES = 5          # codes tried on one pending second step
STEP_KINDS = ("code", "enrol", "add")  # sign-in code; enrolment at sign-in; enrolment at P/totp
FRESH_PASSWORD = 300    # P/totp needs a password typed this recently
MAX_PENDING = 10000     # pending steps remembered (those that have had a code)


def step_key(key):
    """The key that signs pending steps: derived from a token key, so that a
    pending value never passes as a session token, nor a token as a step."""
    return hmac.new(key, b"authd: pending second step", hashlib.sha256).digest()


def new_step(user, kind, auth_time, now):
    claims = {"sub": user.name, "pwh": user.fingerprint, "auth_time": auth_time, "exp": now + STEP_SECONDS,
              "jti": secrets.token_urlsafe(12), "step": kind}
    if kind != "code":
        claims["secret"] = new_totp_secret()
    return claims


def open_step(value, keys, now):
    """The claims of a pending step signed with one of KEYS and not expired, else None."""
    if not isinstance(value, str) or len(value) > MAX_TOKEN or value.count(".") != 2:
        return None
    header, payload, signature = value.split(".")
    try:
        given = b64url_decode(signature)
        signing_input = (header + "." + payload).encode("ascii")
        matched = False
        for key in keys:
            expected = hmac.new(step_key(key), signing_input, hashlib.sha256).digest()
            matched |= hmac.compare_digest(expected, given)
        claims = strict_json(b64url_decode(payload)) if matched and header == TOKEN_HEADER else None
    except (ValueError, UnicodeError, RecursionError, binascii.Error):
        return None
    if not isinstance(claims, dict) or claims.get("step") not in STEP_KINDS:
        return None
    if not (valid_name(claims.get("sub")) and isinstance(claims.get("pwh"), str) and _is_int(claims.get("exp"))
            and _is_int(claims.get("auth_time")) and isinstance(claims.get("jti"), str)
            and (claims["step"] == "code" or isinstance(claims.get("secret"), str))):
        return None
    if not now < claims["exp"] <= now + STEP_SECONDS + CLOCK_SKEW:
        return None
    return claims


class CodeLedger:
    """What authd remembers about codes, in bounded memory: per user, the last
    step accepted (a code is refused again while it could still be valid, and
    so is any older one, as RFC 6238 section 5.2 advises); per pending step,
    the codes tried."""

    def __init__(self, max_pending=MAX_PENDING):
        self.lock = threading.Lock()
        self.last_step = {}             # user name -> last accepted step (only while still current)
        self.tries = OrderedDict()      # pending step id -> [expiry, codes tried]
        self.max_pending = max_pending

    def accept(self, name, step, now):
        """Record STEP as used by NAME; False if it (or a later one) was used."""
        with self.lock:
            oldest_valid = totp_step(now) - TOTP_WINDOW
            for old in [n for n, s in self.last_step.items() if s < oldest_valid]:
                del self.last_step[old]  # bounded: only steps that could still be replayed
            if self.last_step.get(name, oldest_valid - 1) >= step:
                return False
            self.last_step[name] = step
            return True

    def try_code(self, step_id, expiry, now):
        """Count one code on a pending step: False once it has had STEP_CODES
        (or succeeded), and when the table is full of live steps (fail closed)."""
        with self.lock:
            while self.tries and next(iter(self.tries.values()))[0] <= now:
                self.tries.popitem(last=False)
            entry = self.tries.get(step_id)
            if entry is None:
                if len(self.tries) >= self.max_pending:
                    return False
                entry = self.tries[step_id] = [expiry, 0]
            if entry[1] >= STEP_CODES:
                return False
            entry[1] += 1
            return True

    def spend(self, step_id):
        """A step that succeeded takes no more codes (a replayed value is refused)."""
        with self.lock:
            if step_id in self.tries:
                self.tries[step_id][1] = STEP_CODES


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


def retry_after(reply, seconds):
    reply.headers.append(("Retry-After", str(seconds)))
    return reply


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


def parse_header_line(line):
    """"Name: value" -> (lower-case name, value); None for a blank line."""
    match = HEADER_LINE_RE.fullmatch(line)
    if match is None:
        if line in ("", "\r"):
            return None
        raise HTTPError(400, header_line_problem(line))
    return match.group(1).lower(), match.group(2).rstrip(" \t")


class Parsed(dict):
    """PARSE(line), remembered: most lines repeat from one request to the
    next (the request line, Host, Cookie, the X-Original-* lines of a page's
    assets), and a dict lookup costs far less than a parse. Bounded: at most
    1024 lines of at most 1024 characters; a line that fails is not kept."""

    def __init__(self, parse):
        super().__init__()
        self.parse = parse

    def __missing__(self, line):
        result = self.parse(line)
        if len(line) <= 1024:
            if len(self) >= 1024:
                self.clear()
            self[line] = result
        return result


HEADER_LINES = Parsed(parse_header_line)
REQUEST_LINES = Parsed(lambda line: parse_request_line(line.encode("latin-1")))


def parse_header_fields(lines):
    """Header lines -> {lower-case name: value}; HTTPError for anything
    malformed, and for a repeat of a field that must be single."""
    headers = {}
    for line in lines:
        field = HEADER_LINES[line]
        if field is None:
            continue
        name, value = field
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
    method, target, version = REQUEST_LINES[lines[0].rstrip("\r")]
    if len(lines) - 1 > MAX_HEADERS:
        raise HTTPError(431, "too many header fields")
    request = Request()
    request.method, request.target, request.version = method, target, version
    request.headers = headers = parse_header_fields(lines[1:])
    if version == b"HTTP/1.1" and "host" not in headers:
        raise HTTPError(400, "an HTTP/1.1 request needs a Host header")  # RFC 9112, section 3.2
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


def cache_key_is_the_token(header, name):
    """True when nginx's $cookie_NAME (the micro-cache key) must be the very
    value authd verified: NAME occurs once in the whole header, in any case
    (nginx matches names case-insensitively and also splits on ","), at the
    start or after ";" or "; ", with a plain token value. Otherwise nginx may
    key the answer under another value -- the empty key every visitor without
    a cookie shares -- and serve it to them (cache poisoning)."""
    if header.lower().count(name.lower()) != 1:
        return False
    return re.search(r"(?:^|;[ ]?)%s=[A-Za-z0-9._-]+(?:;|$)" % re.escape(name), header) is not None


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


def form_fields(request):
    """The fields of a form-urlencoded body (the last of a repeated name), or
    None when it is malformed or of another type."""
    if request.content_type() not in ("application/x-www-form-urlencoded", ""):
        return None
    try:
        text = request.body.decode("utf-8")
        return dict(urllib.parse.parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text),
                                           max_num_fields=20, errors="strict"))
    except (ValueError, UnicodeError):
        return None


def parse_login_body(request):
    """(username, password, rd or None) from a JSON or form body, "" for a
    missing user name or password; ValueError with a message for a body
    that cannot be read."""
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
        data = form_fields(request)
        if data is None:
            raise ValueError("The form data is malformed")
        target = data.get("rd")
    else:
        raise UnsupportedMediaType("Content-Type must be application/x-www-form-urlencoded or application/json")
    # Missing or non-text credentials are wrong credentials (401, as the
    # Express API answers), which the caller refuses without hashing.
    name, password = data.get("username"), data.get("password")
    return (name if isinstance(name, str) else "", password if isinstance(password, str) else "", target)


def json_code(request):
    """The two-factor "code" of a JSON login body: None when absent, "" when
    not a string (a number would have lost its leading zeros)."""
    try:
        data = strict_json(request.body)
    except (ValueError, UnicodeError, RecursionError):
        return None
    code = data.get("code") if isinstance(data, dict) else None
    return None if code is None else code if isinstance(code, str) else ""


# ---------------------------------------------------------------------------
# QR codes (ISO/IEC 18004), just enough to show an otpauth:// URI: byte mode,
# error correction level M (15% of the symbol may be lost), the smallest
# version (size) that holds the text, the mask with the lowest penalty.
# A symbol is a square list of rows of booleans, True for a dark module.
# ---------------------------------------------------------------------------

# Per version 1-40 at level M: error correction codewords per block, and the
# number of blocks (ISO/IEC 18004:2015 Table 9). Index 0 is unused.
QR_ECC_PER_BLOCK_M = (
    None, 10, 16, 26, 18, 24, 16, 18, 22, 22, 26, 30, 22, 22, 24, 24, 28, 28, 26, 26,
    26, 26, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28)
QR_BLOCKS_M = (
    None, 1, 1, 1, 2, 2, 4, 4, 4, 5, 5, 5, 8, 9, 9, 10, 10, 11, 13, 14, 16,
    17, 17, 18, 20, 21, 23, 25, 26, 28, 29, 31, 33, 35, 37, 38, 40, 43, 45, 47, 49)
QR_FORMAT_LEVEL_M = 0b00  # the two error-correction bits of the format information
QR_PAD_BYTES = (0xEC, 0x11)  # the standard's alternating filler


def qr_size(version):
    return 17 + 4 * version


def _qr_alignment_positions(version):
    """Row/column centres of the alignment patterns: 6, then evenly spaced (even
    steps) back from the far edge, as in the standard's Annex E table."""
    if version == 1:
        return []
    count = version // 7 + 2
    step = (version * 8 + count * 3 + 5) // (count * 4 - 4) * 2
    last = qr_size(version) - 7
    return [6] + [last - i * step for i in range(count - 2, -1, -1)]


def _qr_total_codewords(version):
    """Codewords in a symbol: the modules left after all function patterns, / 8."""
    modules = (16 * version + 128) * version + 64
    if version >= 2:
        count = version // 7 + 2
        modules -= (25 * count - 10) * count - 55  # alignment patterns, less overlap with timing
    if version >= 7:
        modules -= 36  # two version information blocks
    return modules // 8


def qr_data_capacity(version):
    """Data codewords (bytes) at level M."""
    return _qr_total_codewords(version) - QR_ECC_PER_BLOCK_M[version] * QR_BLOCKS_M[version]


def _qr_count_bits(version):
    return 8 if version <= 9 else 16  # byte-mode character count indicator


def qr_smallest_version(length):
    """The smallest version whose level-M capacity holds LENGTH bytes in byte mode."""
    for version in range(1, 41):
        needed = 4 + _qr_count_bits(version) + 8 * length
        if needed <= 8 * qr_data_capacity(version):
            return version
    raise ValueError("too long for a QR code: %d bytes" % length)


def _qr_data_codewords(data, version):
    """Mode, count, the bytes, a terminator, then padding to the full capacity."""
    bits = "0100" + format(len(data), "0%db" % _qr_count_bits(version))
    bits += "".join(format(byte, "08b") for byte in data)
    capacity = 8 * qr_data_capacity(version)
    bits += "0" * min(4, capacity - len(bits))  # terminator, shortened if there is no room
    bits += "0" * (-len(bits) % 8)
    codewords = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    for i in range(capacity // 8 - len(codewords)):
        codewords.append(QR_PAD_BYTES[i % 2])
    return codewords


# ---- Reed-Solomon over GF(256) with the QR polynomial x^8+x^4+x^3+x^2+1.

def _gf_multiply(x, y):
    """Carry-less multiplication modulo 0x11D (Russian peasant)."""
    product = 0
    for i in range(7, -1, -1):
        product = (product << 1) ^ ((product >> 7) * 0x11D)
        product ^= ((y >> i) & 1) * x
    return product


def _rs_generator(degree):
    """Coefficients (highest first, leading 1 dropped) of (x - a^0)...(x - a^(degree-1))."""
    coefficients = [0] * (degree - 1) + [1]
    root = 1
    for _ in range(degree):
        for j in range(degree):
            coefficients[j] = _gf_multiply(coefficients[j], root)
            if j + 1 < degree:
                coefficients[j] ^= coefficients[j + 1]
        root = _gf_multiply(root, 0x02)
    return coefficients


def _rs_remainder(data, generator):
    """The error correction codewords: DATA * x^degree modulo the generator."""
    remainder = [0] * len(generator)
    for byte in data:
        factor = byte ^ remainder.pop(0)
        remainder.append(0)
        for i, coefficient in enumerate(generator):
            remainder[i] ^= _gf_multiply(coefficient, factor)
    return remainder


def _qr_interleave(codewords, version):
    """Split data into blocks, add each block's error correction, and interleave
    column by column (data first, then error correction), as the standard orders them.

    The later blocks are one data codeword longer when the data does not divide evenly.
    """
    block_count = QR_BLOCKS_M[version]
    ecc_length = QR_ECC_PER_BLOCK_M[version]
    short_length = len(codewords) // block_count
    long_blocks = len(codewords) % block_count
    generator = _rs_generator(ecc_length)
    blocks, start = [], 0
    for index in range(block_count):
        length = short_length + (1 if index >= block_count - long_blocks else 0)
        data = codewords[start:start + length]
        start += length
        blocks.append((data, _rs_remainder(data, generator)))
    result = []
    for column in range(short_length + 1):
        result.extend(data[column] for data, _ in blocks if column < len(data))
    for column in range(ecc_length):
        result.extend(ecc[column] for _, ecc in blocks)
    return result


# ---- The symbol: function patterns first, then the data in the remaining modules.

def _qr_draw_rings(modules, reserved, centre_x, centre_y, radius, light):
    """Square rings around a centre, dark but for the LIGHT ones (clipped at
    the edges): a finder pattern with its separator, or an alignment pattern."""
    size = len(modules)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            x, y = centre_x + dx, centre_y + dy
            if 0 <= x < size and 0 <= y < size:
                modules[y][x] = max(abs(dx), abs(dy)) not in light
                reserved[y][x] = True


def _qr_format_bits(mask):
    """15 bits: level and mask, a BCH(15,5) remainder, XORed with the standard's mask."""
    data = QR_FORMAT_LEVEL_M << 3 | mask
    remainder = data
    for _ in range(10):
        remainder = (remainder << 1) ^ ((remainder >> 9) * 0x537)
    return (data << 10 | remainder) ^ 0x5412


def _qr_draw_format(modules, reserved, mask):
    """Both copies of the format information, and the always-dark module."""
    size = len(modules)
    bits = _qr_format_bits(mask)

    def put(x, y, i):
        modules[y][x] = bool(bits >> i & 1)
        reserved[y][x] = True

    for i in range(6):
        put(8, i, i)
    put(8, 7, 6)
    put(8, 8, 7)
    put(7, 8, 8)
    for i in range(9, 15):
        put(14 - i, 8, i)
    for i in range(8):
        put(size - 1 - i, 8, i)
    for i in range(8, 15):
        put(8, size - 15 + i, i)
    modules[size - 8][8] = reserved[size - 8][8] = True


def _qr_draw_version(modules, reserved, version):
    """From version 7: 6 version bits and a BCH(18,6) remainder, in two 6x3 blocks."""
    if version < 7:
        return
    remainder = version
    for _ in range(12):
        remainder = (remainder << 1) ^ ((remainder >> 11) * 0x1F25)
    bits = version << 12 | remainder
    far = len(modules) - 11
    for i in range(18):
        dark = bool(bits >> i & 1)
        a, b = far + i % 3, i // 3
        modules[b][a] = modules[a][b] = dark
        reserved[b][a] = reserved[a][b] = True


def _qr_function_patterns(version):
    """A symbol with only its function patterns, and which modules they take."""
    size = qr_size(version)
    modules = [[False] * size for _ in range(size)]
    reserved = [[False] * size for _ in range(size)]
    for i in range(size):  # timing patterns
        modules[6][i] = modules[i][6] = i % 2 == 0
        reserved[6][i] = reserved[i][6] = True
    for x, y in ((3, 3), (size - 4, 3), (3, size - 4)):
        _qr_draw_rings(modules, reserved, x, y, 4, (2, 4))
    centres = _qr_alignment_positions(version)
    corners = {(6, 6), (6, centres[-1] if centres else 0), (centres[-1] if centres else 0, 6)}
    for y in centres:
        for x in centres:
            if (x, y) not in corners:  # these would overlap a finder pattern
                _qr_draw_rings(modules, reserved, x, y, 2, (1,))
    _qr_draw_format(modules, reserved, 0)  # placeholder: reserves the modules
    _qr_draw_version(modules, reserved, version)
    return modules, reserved


def _qr_place_codewords(modules, reserved, codewords):
    """Bits go up and down two-module-wide columns from the right edge, skipping
    the vertical timing pattern and every reserved module; leftover modules
    (the remainder bits) stay light."""
    size = len(modules)
    bits = [byte >> (7 - i) & 1 for byte in codewords for i in range(8)]
    index = 0
    right = size - 1
    while right >= 1:
        if right == 6:
            right = 5
        upward = (right + 1) & 2 == 0
        for vertical in range(size):
            y = size - 1 - vertical if upward else vertical
            for x in (right, right - 1):
                if not reserved[y][x] and index < len(bits):
                    modules[y][x] = bool(bits[index])
                    index += 1
        right -= 2


QR_MASKS = (
    lambda y, x: (y + x) % 2 == 0,
    lambda y, x: y % 2 == 0,
    lambda y, x: x % 3 == 0,
    lambda y, x: (y + x) % 3 == 0,
    lambda y, x: (y // 2 + x // 3) % 2 == 0,
    lambda y, x: y * x % 2 + y * x % 3 == 0,
    lambda y, x: (y * x % 2 + y * x % 3) % 2 == 0,
    lambda y, x: ((y + x) % 2 + y * x % 3) % 2 == 0,
)


def _qr_masked(modules, reserved, mask):
    """A copy with the mask applied to the data modules and its format bits drawn."""
    condition = QR_MASKS[mask]
    result = [[module != (not fixed and condition(y, x))
               for x, (module, fixed) in enumerate(zip(row, fixed_row))]
              for y, (row, fixed_row) in enumerate(zip(modules, reserved))]
    _qr_draw_format(result, reserved, mask)  # the same modules it reserved
    return result


# ---- Mask choice: the standard's four penalty rules, lowest total wins.

def _qr_line_penalty(line):
    """Rules 1 and 3 along one row or column: runs of 5+ same-colour modules
    (3 points, +1 per extra module), and each dark-light-dark-dark-dark-light-
    dark (1:1:3:1:1) pattern preceded or followed by 4 light modules (40
    points), the light quiet zone beyond the edges counting as light."""
    score, run = 0, 1
    for previous, module in zip(line, line[1:]):
        run = run + 1 if module == previous else 1
        if run == 5:
            score += 3
        elif run > 5:
            score += 1
    text = "0000" + "".join("1" if module else "0" for module in line) + "0000"
    start = text.find("1011101")
    while start != -1:
        if text[start - 4:start] == "0000" or text[start + 7:start + 11] == "0000":
            score += 40
        start = text.find("1011101", start + 1)
    return score


def qr_penalty(modules):
    """The total penalty of a finished symbol (rules 1-4)."""
    score = sum(_qr_line_penalty(line) for line in modules)
    score += sum(_qr_line_penalty(list(line)) for line in zip(*modules))
    for upper, lower in zip(modules, modules[1:]):  # rule 2: 2x2 blocks of one colour
        for x in range(len(upper) - 1):
            if upper[x] == upper[x + 1] == lower[x] == lower[x + 1]:
                score += 3
    total = len(modules) ** 2
    dark = sum(map(sum, modules))
    # rule 4: 10 points for each full 5% by which the dark share differs from 50%
    return score + 10 * (abs(dark * 2 - total) * 10 // total)


def qr_matrix(text):
    """The QR code of TEXT (UTF-8, byte mode, level M, smallest version, best mask)."""
    data = text.encode("utf-8")
    version = qr_smallest_version(len(data))
    codewords = _qr_interleave(_qr_data_codewords(data, version), version)
    modules, reserved = _qr_function_patterns(version)
    _qr_place_codewords(modules, reserved, codewords)
    candidates = [_qr_masked(modules, reserved, mask) for mask in range(8)]
    return min(candidates, key=qr_penalty)


# ---------------------------------------------------------------------------
# Showing a QR code: in a terminal (text) and in a page (inline SVG). Both
# draw dark modules on an explicitly light ground with a 4-module quiet zone,
# because phone cameras read dark-on-light codes and not always the inverse.
# ---------------------------------------------------------------------------

QR_QUIET_ZONE = 4
# SGR 30;47: black characters on a white background, set explicitly so the
# code reads the same on a dark and on a light terminal (the bare default
# colours would invert it on one of them). These are two of the eight base
# colours every terminal has, and colour themes keep black dark and white light.
TERMINAL_DARK_ON_LIGHT = "\x1b[30;47m"
TERMINAL_RESET = "\x1b[0m"
HALF_BLOCKS = {(False, False): " ", (True, False): "\u2580", (False, True): "\u2584", (True, True): "\u2588"}


def qr_with_quiet_zone(modules, border=QR_QUIET_ZONE):
    width = len(modules) + 2 * border
    blank = [False] * width
    return ([blank[:] for _ in range(border)]
            + [[False] * border + list(row) + [False] * border for row in modules]
            + [blank[:] for _ in range(border)])


def qr_terminal(modules):
    """Text lines, two module rows per character (upper and lower half blocks),
    so the modules come out square in a terminal whose cells are twice as high as wide.

    Each line sets the colours at its start and resets them at its end, so a
    line stands alone (pagers, copied text) and the prompt after it is unpainted.
    """
    rows = qr_with_quiet_zone(modules)
    if len(rows) % 2:
        rows.append([False] * len(rows[0]))  # the lower half of the last line: light
    lines = []
    for upper, lower in zip(rows[0::2], rows[1::2]):
        text = "".join(HALF_BLOCKS[pair] for pair in zip(upper, lower))
        lines.append(TERMINAL_DARK_ON_LIGHT + text + TERMINAL_RESET)
    return "\n".join(lines) + "\n"


def qr_svg_path(modules):
    """Path data: one rectangle per horizontal run of dark modules."""
    parts = []
    for y, row in enumerate(modules):
        x = 0
        while x < len(row):
            if not row[x]:
                x += 1
                continue
            start = x
            while x < len(row) and row[x]:
                x += 1
            parts.append("M%d %dh%dv1h-%dz" % (start + QR_QUIET_ZONE, y + QR_QUIET_ZONE,
                                               x - start, x - start))
    return "".join(parts)


def qr_svg(modules, label, pixels_per_module=4):
    """An inline SVG: a white square (the quiet zone and light modules) and one
    black path, colours set by fill attributes (no style attribute, which a CSP
    without 'unsafe-inline' would block), no script, no external reference.
    crispEdges keeps module edges sharp at any scale."""
    size = len(modules) + 2 * QR_QUIET_ZONE
    return ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {n} {n}" width="{px}" height="{px}"'
            ' shape-rendering="crispEdges" role="img" aria-label="{label}">'
            '<rect width="{n}" height="{n}" fill="#fff"/>'
            '<path fill="#000" d="{path}"/></svg>').format(
        n=size, px=size * pixels_per_module, label=html.escape(label), path=qr_svg_path(modules))


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
.error,.notice{margin:0 0 8px;padding:10px 12px;border-radius:8px;background:var(--error-bg);color:var(--error)}
.notice{background:var(--bg);color:var(--text)}
a{color:var(--accent)}.back{margin:20px 0 0;text-align:center}
dl{margin:0}dt{color:var(--muted);margin-top:12px}dd{margin:0;font-weight:600;word-break:break-all}
a{color:var(--accent)}a:focus{outline:3px solid var(--accent);outline-offset:2px}.back{margin:16px 0 0;text-align:center}
.note{margin:16px 0 0;color:var(--muted)}
.qr{display:flex;justify-content:center;margin:16px 0 4px}
.qr svg{max-width:100%;height:auto;border-radius:4px}
.secret{margin:4px 0 8px;text-align:center;font:600 1.05rem/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
word-spacing:.3em;word-break:break-word}
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
<dl><dt>User</dt><dd>{name}</dd><dt>Role</dt><dd>{role}</dd><dt>Groups</dt><dd>{groups}</dd>
<dt>Two-factor sign-in</dt><dd>{two_factor} &middot; <a href="{totp}">{manage}</a></dd></dl>
<form method="post" action="{action}"><button type="submit">Sign out</button></form>
<p class="back"><a href="/">Back to the site</a></p>"""
DROPPED_COOKIE_PAGE = """<h1>Not signed in</h1>
<p class="site">to {site}</p>
<p class="error" role="alert">Your password was right, but this page came over plain http, and your browser
does not keep the session cookie there: it is marked Secure, for https only.</p>
<p>Open the site over https: <a href="{https}">{https}</a></p>
<p>If the site has no https, the administrator can set <code>AUTH_COOKIE_SECURE=false</code> in authd's settings
(anyone on the network can then read the cookie).</p>"""
CODE_INPUT = """<input id="code" name="code" inputmode="numeric" autocomplete="one-time-code" pattern="[0-9 ]{6,7}"
 maxlength="7" spellcheck="false" required autofocus>"""
CODE_PAGE = """<h1>Two-factor code</h1>
<p class="site">{name} on {site}</p>
{error}<form method="post" action="{action}">
<input type="hidden" name="pending" value="{pending}">
<input type="hidden" name="rd" value="{target}">
<label for="code">The 6-digit code from your authenticator app</label>
""" + CODE_INPUT.replace("{", "{{").replace("}", "}}") + """
<button type="submit">Verify</button>
</form>
<p class="note"><a href="{restart}">Sign in as someone else</a></p>"""
ENROL_REQUIRED = "Your account needs two-factor sign-in. Scan this code with an authenticator app, then enter the code it shows."
ENROL_OPTIONAL = "Scan this code with an authenticator app, then enter the code it shows. Signing in will then ask for a code."
ENROL_PAGE = """<h1>Set up two-factor sign-in</h1>
<p class="site">{name} on {site}</p>
<p>{intro}</p>
<div class="qr">{svg}</div>
<p class="note">Or enter this key by hand (time-based, 6 digits):</p>
<p class="secret">{secret}</p>
{error}<form method="post" action="{action}">
<input type="hidden" name="pending" value="{pending}">
<input type="hidden" name="rd" value="{target}">
<label for="code">Code shown by the app</label>
""" + CODE_INPUT.replace("{", "{{").replace("}", "}}") + """
<button type="submit">{button}</button>
</form>"""
TOTP_ON_PAGE = """<h1>Two-factor sign-in</h1>
<p class="site">{name} on {site}</p>
<p>Two-factor sign-in is <strong>on</strong>: signing in asks for a code from your authenticator app.</p>
{error}<form method="post" action="{action}">
<label for="code">To turn it off, enter a current code</label>
""" + CODE_INPUT.replace("{", "{{").replace("}", "}}") + """
<button type="submit">Turn off two-factor sign-in</button>
</form>
<p class="note"><a href="{back}">Back</a></p>"""
QR_PAGE_PIXELS = 240  # about this wide on a page: an integer number of pixels per module


def error_paragraph(message):
    return '<p class="error" role="alert">%s</p>' % html.escape(message) if message else ""


def page(site, title, body):
    return PAGE.format(title=html.escape(title), site=html.escape(site), style=STYLE, body=body).encode("utf-8")


# ---------------------------------------------------------------------------
# The app: what a request may ask and what it is told. Handlers are plain
# functions from Request to Reply; one that needs a password hash returns
# Later, and the server runs it away from the hot path.
# ---------------------------------------------------------------------------

# Verified cookies, emptied when full. An active user's cookie is re-signed
# once a minute, and every new token is an entry (~1.3 KiB): at 10,000 a small
# site's authd grew by 13 MiB before the cache emptied. Emptying costs one
# HMAC check per live cookie.
TOKEN_CACHE_SIZE = 1024
UPSTREAM_PATHS = ("/auth", "/login", "/logout", "/logged-in")  # andygock/auth-server's endpoints
SIGNED_OUT = "signed_out=1"  # the query of the login page after a logout
ISSUE_SLACK = 60  # seconds a token's life may exceed AUTH_EXPIRY_DAYS (rounding, settings reloads)


class Later:
    """A handler's answer that needs a password hash: the server calls
    FUNCTION(*ARGS) on its bounded hash pool, never on the thread that
    serves the hot path, and sends the Reply it returns. When too many
    wait already, it sends BUSY() instead, or App.busy's 503 without one
    (P/auth may answer 2xx, 401 or 403 only)."""
    __slots__ = ("function", "args", "busy")

    def __init__(self, function, *args, busy=None):
        self.function, self.args, self.busy = function, args, busy

    def run(self):
        return self.function(*self.args)


@functools.lru_cache(maxsize=1024)
def parse_rules(query):
    """?group=G1,G2&user=U1,U2 from the nginx config -> (groups, names,
    broken). An unknown parameter or an empty list (group= or group=,: a
    variable that came out empty, a typo) is broken, and denies: a rule must
    fail closed. It is logged once per distinct query."""
    groups, names, broken = set(), set(), []
    for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        listed = [v for v in value.split(",") if v]
        if key in ("group", "groups") and listed:
            groups.update(listed)
        elif key in ("user", "users") and listed:
            names.update(listed)
        else:
            broken.append(key + "=" + value)
    if broken:
        log("error", "bad rule %s in %s; denying (use group=G1,G2 or user=U1,U2)"
            % (quoted(broken[0]), quoted(query)))
    return frozenset(groups), frozenset(names), bool(broken)


class App:
    def __init__(self, settings, keys, store):
        self.store = store
        self.tokens = TokensStore(settings.tokens_file)
        self.pairs = PairCache()
        self.open_connections = lambda: 0  # the server sets this, for the metrics
        self.codes = CodeLedger()
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
        self.routes, self.root_paths = self.route_table(settings.prefix)
        self.store.set_password_user(password_user(settings.password, keys[-1]) if settings.password else None)

    def route_table(self, p):
        """(routes, root paths). With the default prefix, the upstream
        project's endpoints answer at the root too, so its nginx block works
        unchanged; pages link under the prefix the request came in on."""
        routes = {
            p + "/auth": ("*", self.handle_auth),
            p + "/admin": ("*", self.handle_admin),
            p + "/login": ("GET, HEAD, POST", self.handle_login),
            p + "/logout": ("GET, HEAD, POST", self.handle_logout),
            p + "/": ("GET, HEAD", self.handle_whoami),
            p + "/logged-in": ("GET, HEAD", self.handle_whoami),
            p + "/healthz": ("GET, HEAD", self.handle_health),
            p + "/metrics": ("GET, HEAD", self.handle_metrics),
            p + "/login/code": ("GET, HEAD, POST", self.handle_second_step),
            p + "/totp": ("GET, HEAD, POST", self.handle_totp),
            p + "/forward": ("*", self.handle_forward),
            p + "/forbidden": ("*", self.handle_forbidden),
        }
        if p:
            routes[p] = ("GET, HEAD", self.handle_whoami)
        root_paths = frozenset(UPSTREAM_PATHS if p == SETTINGS["AUTH_PREFIX"].default else ())
        routes.update((path, routes[p + path]) for path in root_paths)
        return routes, root_paths

    def base(self, request):
        """The prefix REQUEST came in under: "" for a root path."""
        return "" if request.path in self.root_paths else self.settings.prefix

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
        # The cache before the keys (configure() sets them the other way
        # round): a token verified under keys a reload just replaced then
        # lands in the old cache, which is dropped, never in the new one.
        cache = self.token_cache
        keys = self.keys
        for token in cookie_values(request.headers.get("cookie", ""), self.settings.cookie_name):
            claims = cache.get(token)
            if claims is None:
                claims = decode_token(token, keys, now)
                if claims is None:
                    continue
                if len(cache) >= TOKEN_CACHE_SIZE:
                    cache.clear()
                cache[token] = claims
            elif claims["exp"] <= now:
                continue
            user = self.store.users.get(claims["sub"])
            if user is None or not hmac.compare_digest(user.fingerprint, claims["pwh"]):
                continue
            if (user.totp and claims.get("amr") != list(AMR_TWO_FACTOR)) or (
                    self.settings.totp_groups and self.must_enrol(user)):
                continue  # a session without the second factor that this user needs
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

    # -- P/auth and P/admin (any method): the hot path ---------------------------

    def handle_auth(self, request, admin_only=False):
        now = int(time.time())
        bypass = self.settings.bypass
        if bypass and "x-auth-bypass" in request.headers:
            if hmac.compare_digest(request.headers["x-auth-bypass"].encode("utf-8", "replace"),
                                   bypass.encode("utf-8")):
                AUTH_COUNTS.add("bypass")
                return Reply(200)
            # someone guesses the bypass: say who, never what (it may be a near miss)
            log("warning", "wrong X-Auth-Bypass header from %s" % request.client_ip())
        user, claims = self.session(request, now)
        if user is None:
            if "authorization" in request.headers:
                return self.credentials_auth(request, admin_only, now)
            return self.denied(request)
        if not self.permitted(request, user, admin_only):
            return Reply(403)
        AUTH_COUNTS.add("allow")
        reply = Reply(200, user=user)
        if now - claims["iat"] > REFRESH_AFTER:
            reply.headers.append(("Set-Cookie", self.session_cookie(user, claims["auth_time"], now)))
        elif self.settings.cache_seconds and cache_key_is_the_token(request.headers["cookie"],
                                                                     self.settings.cookie_name):
            reply.headers.append(("X-Accel-Expires", str(max(0, min(self.settings.cache_seconds, claims["exp"] - now)))))
        return reply

    def handle_admin(self, request):
        return self.handle_auth(request, admin_only=True)

    def permitted(self, request, user, admin_only):
        """USER may pass P/admin (when ADMIN_ONLY) and nginx's rules; counts a refusal."""
        if (admin_only and not user.admin) or (request.query and not self.rules_allow(request.query, user)):
            AUTH_COUNTS.add("forbidden")
            return False
        return True

    def denied(self, request):
        """401 from P/auth: a challenge for API clients, and a cleared
        cookie when an invalid one came along."""
        AUTH_COUNTS.add("deny")
        reply = Reply(401)
        if is_api_client(request):
            reply.headers.append(("WWW-Authenticate", CHALLENGE))
        if "cookie" in request.headers and cookie_values(request.headers["cookie"], self.settings.cookie_name):
            reply.headers.append(("Set-Cookie", self.cookie_header("", 0)))
        return reply

    def credentials_auth(self, request, admin_only, now):
        """P/auth with Authorization and no valid cookie. An app token, or a
        pair verified in the last few minutes, answers now; any other pair
        needs a password hash, which runs Later, on the hash pool. A wrong
        pair counts against the login rate limits."""
        header = request.headers["authorization"]
        key = self.pairs.key(header)
        user = self.remembered(key, now)
        if user is not None:
            return self.identified(request, user, admin_only, "basic")
        kind, name, secret = parse_authorization(header)
        if kind == "token":
            return self.identified(request, self.tokens.find(secret, name, self.store.users, now), admin_only, "token")
        user = self.store.users.get(name) if kind == "basic" else None
        if kind is None or has_two_factor(user):  # two-factor users use app tokens
            return self.denied(request)
        if self.count_attempt(request.client_ip(), name):
            log("warning", "login rate limit hit from %s user=%s (Basic)" % (request.client_ip(), quoted(name)))
            return self.denied(request)
        return Later(self.finish_basic, request, admin_only, name, secret, key,
                     busy=lambda: self.basic_busy(request, name))

    def remembered(self, key, now):
        """The user of a pair verified in the last few minutes, if their line
        is still the one it was verified against."""
        remembered = self.pairs.get(key, now)
        user = self.store.users.get(remembered[0]) if remembered else None
        return user if user is not None and user.line() == remembered[1] else None

    def finish_basic(self, request, admin_only, name, password, key):
        """The costly half of a Basic check: verify the pair, remember it.
        Checked again first: a client's first burst queues a job per request,
        and all but those already running find the pair verified."""
        address = request.client_ip()
        user = self.remembered(key, time.time())
        if user is not None:
            self.refund_attempt(address, name)
            return self.identified(request, user, admin_only, "basic")
        try:
            user = self.check_password(name, password)
        except HashBusy:
            return self.basic_busy(request, name)
        if user is None:
            log("warning", "login failed from %s user=%s (Basic)" % (address, quoted(name)))
            return self.denied(request)
        self.refund_attempt(address, name)
        self.pairs.put(key, (user.name, user.line()), time.time())
        return self.identified(request, user, admin_only, "basic")

    def basic_busy(self, request, name):
        """Too many hashes wait: 401 now (the only refusal P/auth has), and
        the attempt does not count against the client."""
        self.refund_attempt(request.client_ip(), name)
        return retry_after(self.denied(request), 5)

    def identified(self, request, user, admin_only, how):
        """The answer for USER, known by HOW (basic or token): no cookie, and
        no X-Accel-Expires (nginx's micro-cache keys on the cookie alone)."""
        if user is None:
            return self.denied(request)
        if not self.permitted(request, user, admin_only):
            return Reply(403)
        AUTH_COUNTS.add(how)
        return Reply(200, user=user)

    def rules_allow(self, query, user):
        """The rules in nginx's query: the user must be in a listed group or
        be a listed user. An unknown parameter denies, so a typo in
        nginx.conf fails closed, and so does a query that lists nobody."""
        groups, names, broken = parse_rules(query)
        if broken:
            return False
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
            if is_api_client(request):
                return self.sign_in_required(request)
            return self.login_page(request, target)
        wants_json = request.content_type() == "application/json"
        if self.cross_site(request):
            log("warning", "cross-site login refused from %s (Origin %s)"
                % (request.client_ip(), quoted(request.headers.get("origin", ""))))
            LOGIN_COUNTS.add("cross-site")
            return self.login_failed(request, wants_json, 403, "Cross-site login refused", target)
        try:
            name, password, form_target = parse_login_body(request)
        except ValueError as e:
            status = 415 if isinstance(e, UnsupportedMediaType) else 400
            return self.login_failed(request, wants_json, status, str(e), target)
        if form_target is not None:
            target = self.checked_target(request, form_target)
        if not name and wants_json and self.store.in_password_mode():
            name = PASSWORD_USER  # the upstream page sends the password alone
        if not name or not password:  # no hash to run: refused at once
            log("warning", "login failed from %s user=%s (no %s)"
                % (request.client_ip(), quoted(name), "password" if name else "user name"))
            return self.wrong_credentials(request, wants_json, target, name)
        wait = self.count_attempt(request.client_ip(), name)
        if wait:
            log("warning", "login rate limit hit from %s user=%s" % (request.client_ip(), quoted(name)))
            LOGIN_COUNTS.add("rate-limited")
            message = "Too many attempts; try again in %d seconds" % wait
            return retry_after(self.login_failed(request, wants_json, 429, message, target, name), wait)
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

    def count_code(self, address, name):
        """Count a two-factor code against the address's and the name's login
        limits (not the hash budget: a code costs no hash). 0 when allowed,
        else the seconds to wait."""
        key, now = rate_key(address), time.time()
        wait = self.address_limits.hit(key, now)
        if not wait:
            wait = self.name_limits.hit(name[:64], now)
            if wait:
                self.address_limits.refund(key)
        return wait

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
            return self.wrong_credentials(request, wants_json, target, name)
        if user.totp or self.must_enrol(user):
            LOGIN_COUNTS.add("two-factor")
            return self.second_step(request, wants_json, user, target)
        return self.signed_in(request, wants_json, user, int(time.time()), target)

    def signed_in(self, request, wants_json, user, auth_time, target):
        """The end of every successful sign-in: the session cookie."""
        address = request.client_ip()
        self.refund_attempt(address, user.name)
        dropped = self.cookie_will_be_dropped(request)
        log("info", "login ok from %s user=%s%s" % (address, quoted(user.name), " (two-factor)" if user.totp else ""))
        LOGIN_COUNTS.add("ok")
        cookie = ("Set-Cookie", self.session_cookie(user, auth_time, int(time.time())))
        if wants_json:
            return Reply(200, headers=[cookie], data={"status": "ok", "user": user.name})
        if dropped:  # a redirect would show the empty form again, without a word
            return self.dropped_cookie_page(request, target, cookie)
        return Reply(303, headers=[cookie, ("Location", target)])

    def check_password(self, name, password):
        """The user if NAME and PASSWORD match, else None. An unknown name is
        checked against a dummy hash so that it costs the same as a known one."""
        user = self.store.users.get(name) if valid_name(name) else None
        stored = user.hash if user else DUMMY_HASH
        try:
            ok = verify_password(password, stored)
        except ValueError:
            ok = False
        if not ok and not stored.startswith("$scrypt$"):
            # A failed {SHA}/$apr1$/crypt check takes a millisecond: without
            # the same scrypt run as everyone else, a stopwatch would tell
            # which names are legacy accounts (the weakest hashes to attack).
            verify_password(password, DUMMY_HASH)
        if not ok or user is None:
            return None
        if not user.hash.startswith("$scrypt$"):  # a legacy format: replaced at login (scrypt keeps its parameters)
            try:
                old = user.fingerprint
                upgraded = self.store.upgrade_hash(name, password, user.hash)
            except (Failure, OSError, HashBusy) as e:
                log("error", "could not upgrade the password hash of %s: %s" % (name, e or "hash slots busy"))
            else:
                log("info", "upgraded the password hash of %s to scrypt" % name if upgraded else
                    "did not upgrade the password hash of %s: its line changed since this login" % name)
                if upgraded:
                    rebind_tokens(self.tokens.path, name, old, upgraded.fingerprint)
                user = upgraded or user
        return user

    def wrong_credentials(self, request, wants_json, target, name):
        LOGIN_COUNTS.add("fail")
        message = "Invalid credentials" if wants_json else "Invalid user name or password"
        return self.login_failed(request, wants_json, 401, message, target, name)

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

    def cookie_will_be_dropped(self, request):
        """True (and logged) when a Secure cookie goes out over plain http to
        a host other than localhost: browsers refuse to store it."""
        if self.settings.cookie_secure and request.headers.get("x-forwarded-proto", "https").lower() == "http" \
                and host_name(request.site_host()) not in ("localhost", "127.0.0.1", "::1"):
            log("warning", "this login came over plain http, where browsers drop the Secure cookie: "
                "serve the site over https, or set AUTH_COOKIE_SECURE=false")
            return True
        return False

    def handle_logout(self, request):
        user, _ = self.session(request, int(time.time()))
        if user is not None:
            log("info", "logout from %s user=%s" % (request.client_ip(), quoted(user.name)))
        cookie = ("Set-Cookie", self.cookie_header("", 0))
        if request.wants_json():
            return Reply(200, headers=[cookie], data={"status": "ok"})
        target = self.return_target(request)
        if target != "/" or self.settings.login_url:  # "sign in as someone else", or a central login page
            return Reply(303, headers=[cookie, ("Location", self.login_location(target))])
        # the login page says "You are signed out" (the cookie alone cannot:
        # it is gone by then)
        return Reply(303, headers=[cookie, ("Location", self.base(request) + "/login?" + SIGNED_OUT)])

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
            if rd is not None and self.is_own_page(rd):
                rd = None  # the login page itself; nothing to return to
        return self.checked_target(request, rd or "/")

    def is_own_page(self, uri):
        """URI is one of authd's pages (a direct visit to the login page)."""
        path, p = uri.split("?", 1)[0], self.settings.prefix
        return (bool(p) and (path == p or path.startswith(p + "/"))) or path in self.root_paths \
            or path in (p + "/login", p + "/logout", p + "/logged-in")

    # -- pages ----------------------------------------------------------------

    def login_page(self, request, target, status=200, message="", name=""):
        site = host_name(request.site_host()) or "this site"
        name = name or (PASSWORD_USER if self.store.in_password_mode() else "")  # only the password is asked
        error = '<p class="error" role="alert">%s</p>' % html.escape(message) if message else ""
        if not message and request.method in ("GET", "HEAD") and SIGNED_OUT in request.query.split("&"):
            error = '<p class="notice" role="status">You are signed out.</p>'
        body = LOGIN_PAGE.format(
            site=html.escape(site), action=html.escape(self.base(request) + "/login"),
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

    def dropped_cookie_page(self, request, target, cookie):
        """The password was right, but the browser will not keep the cookie:
        say so, and what changes it, on the page."""
        site = host_name(request.site_host()) or "this site"
        https = "https://%s%s" % (request.site_host().strip(), target)
        body = DROPPED_COOKIE_PAGE.format(site=html.escape(site), https=html.escape(https))
        return Reply(200, headers=[cookie], page=page(site, "Not signed in", body))

    def handle_whoami(self, request):
        user, _ = self.session(request, int(time.time()))
        if user is None:
            return Reply(303, headers=[("Location", self.base(request) + "/login")])
        groups = ", ".join(user.groups) or "none"
        body = WHOAMI_PAGE.format(name=html.escape(user.name), role="an administrator" if user.admin else "a user",
                                  groups=html.escape(groups), action=html.escape(self.base(request) + "/logout"),
                                  two_factor="on" if user.totp else "off", totp=html.escape(self.base(request) + "/totp"),
                                  manage="turn off" if user.totp else "set up")
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
        LOGIN_COUNTS.add("busy")
        wants_json = request.content_type() == "application/json" if wants_json is None else wants_json
        return retry_after(self.login_failed(request, wants_json, 503, "The server is busy; try again in a moment",
                                             target or self.return_target(request)), 5)

    def handle_health(self, request):
        return text_reply(200, "ok")

    def sign_in_required(self, request):
        """GET P/login from an API client (nginx's error page for a protected
        URL): 401 and JSON, never the form. The challenge comes along only
        when asked directly: behind error_page, nginx already passes on
        P/auth's, and a second one would confuse clients."""
        reply = Reply(401, data={"status": "fail", "message": "Sign in with HTTP Basic or an app token"})
        original = request.headers.get("x-original-uri")
        if original is None or original.startswith(self.settings.prefix + "/"):
            reply.headers.append(("WWW-Authenticate", CHALLENGE))
        return reply

    def handle_metrics(self, request):
        """The metrics, for an app token of a user in group admin or metrics."""
        now = int(time.time())
        kind, name, secret = parse_authorization(request.headers.get("authorization", ""))
        user = self.tokens.find(secret, name, self.store.users, now) if kind == "token" else None
        if user is None and self.session(request, now)[0] is None:
            reply = Reply(401, data={"status": "fail", "message": "An app token of a user in group admin or "
                                                                  "metrics is required"})
            if is_api_client(request):
                reply.headers.append(("WWW-Authenticate", CHALLENGE))
            return reply
        if user is None or not METRICS_GROUPS.intersection(user.groups):
            return Reply(403, data={"status": "fail", "message": "Only an app token of a user in group admin "
                                                                 "or metrics may read the metrics"})
        return Reply(200, body=render_metrics(self).encode("utf-8"), content_type=METRICS_TYPE)

    # -- two-factor sign-in: the second step after the password ---------------

    def must_enrol(self, user):
        """A member of AUTH_TOTP_GROUPS without two-factor gets no session until enrolled."""
        return not user.totp and not self.settings.totp_groups.isdisjoint(user.groups)

    def check_code(self, name, secret, code, now):
        """True if CODE is current for SECRET and NAME has not used it (or a later one)."""
        step = totp_verify(totp_key(secret), code, now)
        return step is not None and self.codes.accept(name, step, now)

    def second_step(self, request, wants_json, user, target):
        """After a correct password, for a user with two-factor (or who must
        enrol): the JSON API checks the body's "code" now; a browser gets the
        code (or enrolment) page holding a signed pending step."""
        address, now = request.client_ip(), int(time.time())
        if not wants_json:
            self.refund_attempt(address, user.name)  # the password was right; each code counts on its own
            claims = new_step(user, "code" if user.totp else "enrol", now, now)
            return self.step_page(request, sign_token(claims, step_key(self.keys[0])), claims, user, target)
        if not user.totp:
            return Reply(401, data={"status": "fail", "message": "Two-factor sign-in must be set up first, in a browser",
                                    "totp": True, "enrol": True})
        code = json_code(request)
        if code is None:
            self.refund_attempt(address, user.name)
            return Reply(401, data={"status": "fail", "message": "Code required", "totp": True})
        if not self.check_code(user.name, user.totp, code, now):
            log("warning", "login failed from %s user=%s (wrong two-factor code)" % (address, quoted(user.name)))
            return Reply(401, data={"status": "fail", "message": "Invalid code", "totp": True})
        return self.signed_in(request, wants_json, user, now, target)

    def handle_second_step(self, request):
        """POST P/login/code: a code for a pending step from the code or
        enrolment page. Each code counts against the login rate limits."""
        target = self.return_target(request)
        if request.method in ("GET", "HEAD"):
            return Reply(303, headers=[("Location", self.settings.prefix + "/login")])
        if self.cross_site(request):
            return self.login_failed(request, False, 403, "Cross-site login refused", target)
        fields = form_fields(request)
        if fields is None:
            return self.login_failed(request, False, 400, "The form data is malformed", target)
        target, now = self.checked_target(request, fields.get("rd") or "/"), int(time.time())
        claims = open_step(fields.get("pending"), self.keys, now)
        user = self.store.users.get(claims["sub"]) if claims and claims["step"] != "add" else None
        if user is None or not hmac.compare_digest(user.fingerprint, claims["pwh"]) \
                or (claims["step"] == "code") != bool(user.totp):
            return self.login_failed(request, False, 401, "This sign-in has expired; please sign in again", target)
        wait = self.count_code(request.client_ip(), user.name)
        if wait:
            message = "Too many attempts; try again in %d seconds" % wait
            return retry_after(self.login_failed(request, False, 429, message, target), wait)
        if not self.codes.try_code(claims["jti"], claims["exp"], now):
            return self.login_failed(request, False, 401, "Too many codes; please sign in again", target, user.name)
        return self.check_step(request, user, fields, claims, target, now)

    def check_step(self, request, user, fields, claims, target, now):
        """The code of a pending sign-in step: wrong keeps the step, right
        signs in (after saving the secret, for an enrolment)."""
        secret = user.totp if claims["step"] == "code" else claims["secret"]
        if not self.check_code(user.name, secret, fields.get("code", ""), now):
            log("warning", "login failed from %s user=%s (wrong two-factor code)"
                % (request.client_ip(), quoted(user.name)))
            return self.step_page(request, fields["pending"], claims, user, target, 401,
                                  "That code is not right (or was used already); try the next one")
        self.codes.spend(claims["jti"])
        if claims["step"] == "enrol":
            return Later(self.finish_enrolment, request, user, claims, target)
        return self.signed_in(request, False, user, claims["auth_time"], target)

    def finish_enrolment(self, request, user, claims, target):
        """Enrolment at sign-in, confirmed by a code: save the secret, then sign in."""
        try:
            enrolled = self.save_totp(user.name, claims["pwh"], claims["secret"])
        except (Failure, OSError) as e:
            log("error", "could not save the two-factor secret of %s: %s" % (user.name, e))
            return self.login_failed(request, False, 503, "The server could not save this; try again later", target)
        if enrolled is None:
            return self.login_failed(request, False, 401, "This sign-in has expired; please sign in again", target)
        log("info", "two-factor sign-in enabled for %s at sign-in" % quoted(user.name))
        return self.signed_in(request, False, enrolled, claims["auth_time"], target)

    def save_totp(self, name, fingerprint, secret):
        """Set (or, with SECRET None, remove) NAME's two-factor secret if their
        line still has FINGERPRINT; the User as reloaded, or None."""
        def change(entries, users):
            user = users.get(name)
            if user is None or not hmac.compare_digest(user.fingerprint, fingerprint):
                return False
            set_user(entries, name, totp=secret)
            return True

        if not edit_users_file(self.store.path, change):
            return None
        self.store.load()
        return self.store.users.get(name)

    def step_page(self, request, value, claims, user, target, status=200, message=""):
        """The code page, or the enrolment page (QR code) of a sign-in step."""
        site = host_name(request.site_host()) or "this site"
        fields = dict(name=html.escape(user.name), site=html.escape(site), pending=html.escape(value),
                      target=html.escape(target), error=error_paragraph(message),
                      action=html.escape(self.settings.prefix + "/login/code"),
                      restart=html.escape(self.settings.prefix + "/login?rd=" + urllib.parse.quote(target, safe="")))
        if claims["step"] == "code":
            return Reply(status, page=page(site, "Two-factor code", CODE_PAGE.format(**fields)))
        body = ENROL_PAGE.format(intro=ENROL_REQUIRED, button="Turn on and sign in",
                                 **self.enrolment_fields(request, user, claims["secret"]), **fields)
        return Reply(status, page=page(site, "Set up two-factor sign-in", body))

    def enrolment_fields(self, request, user, secret):
        """The QR code (inline SVG) and the key in text, for an enrolment page."""
        issuer = self.settings.totp_issuer or host_name(request.site_host()) or TOTP_ISSUER_DEFAULT
        modules = qr_matrix(totp_uri(secret, user.name, issuer))
        size = len(modules) + 2 * QR_QUIET_ZONE
        svg = qr_svg(modules, "QR code to scan with an authenticator app", max(2, QR_PAGE_PIXELS // size))
        return {"svg": svg, "secret": " ".join(secret[i:i + 4] for i in range(0, len(secret), 4))}

    # -- two-factor sign-in: P/totp, for a signed-in user ----------------------

    def handle_totp(self, request):
        """P/totp: turn two-factor sign-in on or off. Needs a session whose
        password was typed in the last 5 minutes; older ones sign in again."""
        now = int(time.time())
        user, claims = self.session(request, now)
        here = self.settings.prefix + "/totp"
        if user is None:
            return Reply(303, headers=[("Location", self.settings.prefix + "/login?rd=" + urllib.parse.quote(here))])
        if now - claims["auth_time"] >= FRESH_PASSWORD:
            return self.login_page(request, here, name=user.name,
                                   message="Please enter your password again to change two-factor sign-in")
        if request.method in ("GET", "HEAD"):
            return self.totp_page(request, user, now)
        if self.cross_site(request):
            log("warning", "cross-site two-factor change refused from %s" % request.client_ip())
            return self.totp_page(request, user, now, 403, "Cross-site request refused")
        fields = form_fields(request)
        if fields is None:
            return self.totp_page(request, user, now, 400, "The form data is malformed")
        wait = self.count_code(request.client_ip(), user.name)
        if wait:
            message = "Too many attempts; try again in %d seconds" % wait
            return retry_after(self.totp_page(request, user, now, 429, message), wait)
        return self.change_totp(request, user, claims, fields, now)

    def change_totp(self, request, user, claims, fields, now):
        """A confirmed change: removal needs a current code; enrolment a code
        of the new secret from the (signed) enrolment step on the page."""
        secret, value = None, fields.get("pending")
        step = None if user.totp else open_step(value, self.keys, now)
        if not user.totp:
            if not step or step["step"] != "add" or step["sub"] != user.name \
                    or not hmac.compare_digest(step["pwh"], user.fingerprint):
                return self.totp_page(request, user, now, 400, "This page has expired; here is a new code")
            if not self.codes.try_code(step["jti"], step["exp"], now):
                return self.totp_page(request, user, now, 401, "Too many codes; here is a new QR code")
            secret = step["secret"]
        if not self.check_code(user.name, secret or user.totp, fields.get("code", ""), now):
            log("warning", "login failed from %s user=%s (wrong two-factor code)"
                % (request.client_ip(), quoted(user.name)))
            return self.totp_page(request, user, now, 401,
                                  "That code is not right (or was used already); try the next one", value)
        if step:
            self.codes.spend(step["jti"])
        return Later(self.store_totp_change, request, user, claims, secret)

    def store_totp_change(self, request, user, claims, secret):
        """Save the change; this browser gets a new session, every other
        session of the user ends (the fingerprint changed)."""
        try:
            changed = self.save_totp(user.name, user.fingerprint, secret)
        except (Failure, OSError) as e:
            log("error", "could not save the two-factor change of %s: %s" % (user.name, e))
            return self.totp_page(request, user, int(time.time()), 503, "The server could not save this; try later")
        if changed is None:
            return Reply(303, headers=[("Location", self.settings.prefix + "/totp")])
        self.refund_attempt(request.client_ip(), user.name)
        log("info", "two-factor sign-in %s for %s from %s; other sessions end"
            % ("enabled" if secret else "removed", quoted(user.name), request.client_ip()))
        cookie = self.session_cookie(changed, claims["auth_time"], int(time.time()))
        return Reply(303, headers=[("Set-Cookie", cookie), ("Location", self.settings.prefix + "/")])

    def totp_page(self, request, user, now, status=200, message="", value=None):
        """P/totp's page: the enrolment (a new secret unless VALUE holds a
        pending one) or, for a user with two-factor, the form to turn it off."""
        site = host_name(request.site_host()) or "this site"
        fields = dict(name=html.escape(user.name), site=html.escape(site), error=error_paragraph(message),
                      action=html.escape(self.settings.prefix + "/totp"), target="",
                      back=html.escape(self.settings.prefix + "/"))
        if user.totp:
            return Reply(status, page=page(site, "Two-factor sign-in", TOTP_ON_PAGE.format(**fields)))
        claims = open_step(value, self.keys, now) if value else None
        if not claims or claims["step"] != "add" or claims["sub"] != user.name:
            claims = new_step(user, "add", now, now)
            value = sign_token(claims, step_key(self.keys[0]))
        body = ENROL_PAGE.format(intro=ENROL_OPTIONAL, button="Turn on two-factor sign-in", pending=html.escape(value),
                                 **self.enrolment_fields(request, user, claims["secret"]), **fields)
        return Reply(status, page=page(site, "Set up two-factor sign-in", body))


# ---------------------------------------------------------------------------
# Metrics: P/metrics in the Prometheus text format (version 0.0.4), built at
# each scrape from the counts above and a few gauges read on the spot.
# ---------------------------------------------------------------------------

METRICS_GROUPS = frozenset(("admin", "metrics"))
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def metric_lines(name, kind, help_text, samples):
    """One family; SAMPLES: (name suffix, ((label, value), ...), number)."""
    lines = ["# HELP %s %s" % (name, help_text), "# TYPE %s %s" % (name, kind)]
    for suffix, labels, value in samples:
        text = "{%s}" % ",".join('%s="%s"' % label for label in labels) if labels else ""
        lines.append("%s%s%s %s" % (name, suffix, text, repr(value)))
    return lines


def by_label(label, totals):
    return [("", ((label, key),), value) for key, value in totals.items()]


def one(value):
    return [("", (), value)]


def hash_time_samples():
    cumulative, total, count = HASH_TIMES.snapshot()
    bounds = ["%g" % bound for bound in HASH_TIMES.bounds] + ["+Inf"]
    return [("_bucket", (("le", le),), n) for le, n in zip(bounds, cumulative)] + \
        [("_sum", (), total), ("_count", (), count)]


def resident_memory():
    """Bytes of the process in RAM now (Linux); elsewhere the peak."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def render_metrics(app):
    cpu = os.times()
    families = [
        ("authd_auth_requests_total", "counter", "Answers of P/auth and P/admin by result (basic and token: "
         "allowed by HTTP Basic or an app token).", by_label("result", AUTH_COUNTS.totals())),
        ("authd_logins_total", "counter", "Logins by result.", by_label("result", LOGIN_COUNTS.totals())),
        ("authd_hash_seconds", "histogram", "Time taken by password hashes.", hash_time_samples()),
        ("authd_connections_open", "gauge", "Client connections open.", one(app.open_connections())),
        ("authd_users_loaded", "gauge", "Users in the users file.", one(len(app.store.users))),
        ("authd_reloads_total", "counter", "Reloads of the users file by result.",
         by_label("result", RELOAD_COUNTS.totals())),
        ("authd_token_cache_entries", "gauge", "Verified session cookies cached.", one(len(app.token_cache))),
        ("authd_basic_cache_entries", "gauge", "Verified Basic pairs remembered.", one(len(app.pairs))),
        ("authd_app_tokens", "gauge", "App tokens loaded.", one(len(app.tokens.tokens))),
        ("authd_build_info", "gauge", "The version of authd and of Python.", [("", (
            ("version", __version__), ("python", "%d.%d.%d" % sys.version_info[:3])), 1)]),
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", one(resident_memory())),
        ("process_cpu_seconds_total", "counter", "User and system CPU time in seconds.", one(cpu.user + cpu.system)),
        ("process_start_time_seconds", "gauge", "Start time of the process since the epoch in seconds.",
         one(STARTED)),
    ]
    return "\n".join(line for family in families for line in metric_lines(*family)) + "\n"


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


RELEASE_AFTER_CLOSED = 1000  # connections closed since the peak before memory goes back
COLLECT_AFTER_CLOSED = 100   # closed connections let pile up before a collection (more while more are open)
# Looked up once, at start: a CDLL made per call is a new class, a cycle
# that outlives the collection just run, made among what the burst freed.
MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


def release_memory():
    """Give the system back what a burst of connections left: a closed
    asyncio transport is a reference cycle (it holds a bound method of
    itself), freed only by the cycle collector, which an idle server does not
    run; and glibc keeps freed memory for reuse."""
    gc.collect()
    if MALLOC_TRIM is not None:  # elsewhere nothing to do
        MALLOC_TRIM(0)


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
    __slots__ = ("server", "transport", "peer", "buffer", "pending", "length", "deadline",
                 "busy", "closed", "write_paused", "read_paused")

    def __init__(self, server):
        self.server, self.buffer, self.pending, self.length = server, b"", None, 0
        self.busy = self.closed = self.write_paused = self.read_paused = False

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
        if len(self.buffer) > MAX_BUFFERED and not self.read_paused:
            self.transport.pause_reading()  # until the requests already here are answered
            self.read_paused = True
        self.process()

    def process(self):
        """Answer every complete request in the buffer, in order."""
        while self.buffer and not (self.busy or self.closed or self.write_paused):
            try:
                request = self.next_request()
            except HTTPError as e:
                return self.send(render_reply(text_reply(e.status, str(e)), None, True), close=True)
            if request is None:
                break  # the rest is a partial request: read on (resume below if paused)
            self.answer(request)
        if not (self.busy or self.closed):
            if self.read_paused and len(self.buffer) <= MAX_BUFFERED:
                self.transport.resume_reading()  # asked only when paused: it costs a call per request
                self.read_paused = False
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
        self.connections, self.accepted, self.waiting_hashes, self.peak, self.last_count = set(), 0, 0, 0, 0
        self.closed_uncollected = 0
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
        self.closed_uncollected += 1
        if not self.accepting:
            self.listen(True)

    def run_later(self, connection, request, later, close):
        """Run a Later job on the hash pool, then answer on the loop."""
        if self.waiting_hashes >= MAX_WAITING_HASHES:
            reply = later.busy() if later.busy else self.app.busy(request)
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
        """Close the connections whose deadline passed; every SWEEP_EVERY.
        Once RELEASE_AFTER_CLOSED connections closed since the peak, memory
        goes back when the drop is over (none open, or no fewer than at the
        last sweep): released in the middle of it, the transports of those
        that closed after stayed uncollected (cycles) until the next drop.
        Between drops, closed connections are collected as they pile up."""
        now = time.monotonic()
        for connection in [c for c in self.connections if c.deadline <= now and not c.busy]:
            connection.timed_out()
        count = len(self.connections)
        self.peak = max(self.peak, count)
        if self.peak - count >= RELEASE_AFTER_CLOSED and (count == 0 or count >= self.last_count):
            # a set never shrinks: a fresh one, not a table sized for the peak
            self.peak, self.connections = count, set(self.connections)
            release_memory()
            self.closed_uncollected = 0
        elif self.closed_uncollected > max(COLLECT_AFTER_CLOSED, count):
            self.collect_closed()
        self.last_count = count
        self.loop.call_later(SWEEP_EVERY, self.sweep)

    def collect_closed(self):
        """Free the closed connections' transports (reference cycles). The
        collector's own thresholds count objects allocated and not yet freed,
        which a busy server's requests hardly add to: under a benchmark's mix,
        closed connections piled up for minutes, 3 MiB in 12. Collecting once
        more have closed than are open keeps the garbage under the live set,
        at a cost that is constant per closed connection."""
        gc.collect()
        self.closed_uncollected = 0

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


def exposed_host_warning(host):
    """A warning when authd listens on HOST, an address that is not loopback;
    else None."""
    try:
        if host == "localhost" or ipaddress.ip_address(host.split("%", 1)[0]).is_loopback:
            return None
    except ValueError:
        pass
    return ("AUTH_HOST %s is not a loopback address: clients on the network can reach authd directly, around "
            "nginx. Listen on 127.0.0.1 (or AUTH_SOCKET) unless nginx runs on another machine, and then let a "
            "firewall admit only that machine" % host)


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
            reload_tokens(app.tokens)
            notify_systemd("READY=1")
        else:
            reload_changed_files(app)

    def watch():
        if app.store.changed() or app.tokens.changed():
            reloads.submit(reload, False)
        loop.call_later(1.0, watch)

    loop.add_signal_handler(signal.SIGHUP, lambda: reloads.submit(reload, True))
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_server, server)
    release_memory()  # what reading the code and files at start left behind
    # What is alive now lives as long as the server: frozen, the collector
    # never scans it again (a full collection 2.4 ms -> under 0.1 ms). A reload
    # replaces settings and users without cycles, so none of it leaks.
    gc.freeze()
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


def reload_changed_files(app):
    """Reload the users and tokens files if their modification time changed."""
    if app.store.changed():
        reload_users(app.store)
    if app.tokens.changed():
        reload_tokens(app.tokens)


def reload_users(store):
    try:
        users = store.load()
        log("info", "loaded %d user(s) from %s" % (len(users), store.path))
        RELOAD_COUNTS.add("ok")
    except HashBusy:
        # Logins hold every hash slot. A reload must never stop the server:
        # the signature stays old, so the watch loop retries in a second.
        log("warning", "could not hash the plaintext passwords in %s: the hash slots are busy; "
            "will retry in a moment (kept the previous users)" % store.path)
    except (UsersFileError, Failure, OSError) as e:
        store.signature = store.file_signature()  # don't retry until the file changes again
        log("error", "kept the previous users: %s" % str(e).replace("\n", "; "))
        RELOAD_COUNTS.add("error")


def reload_tokens(tokens):
    try:
        loaded = tokens.load()
        log("info", "loaded %d app token(s) from %s" % (len(loaded), tokens.path))
    except (UsersFileError, OSError) as e:
        tokens.signature = tokens.file_signature()  # don't retry until the file changes again
        log("error", "kept the previous app tokens: %s" % str(e).replace("\n", "; "))


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

MIN_PASSWORD = 8  # characters a new password needs, unless --allow-short


def read_password(prompt=True, minimum=1):
    """A new password of at least MINIMUM characters: asked twice on a
    terminal, else the first line of stdin."""
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
    if len(password) < minimum:
        raise Failure("the password has %d characters; use at least %d (or pass --allow-short to take it anyway)"
                      % (len(password), minimum))
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
    if args.name in read_users_file(settings.users_file)[1]:  # before asking a password that would be thrown away
        raise Failure("user %s already exists (use 'passwd' to change the password)" % args.name)
    new_hash = hash_password(read_password(minimum=1 if args.allow_short else MIN_PASSWORD))
    secret = enrol_in_terminal(args.name, args.issuer or settings.totp_issuer) if args.totp else None

    def add(entries, users):
        if args.name in users:
            raise Failure("user %s already exists (use 'passwd' to change the password)" % args.name)
        entries.append(User(args.name, new_hash, groups, secret))

    edit_users_file(settings.users_file, add)
    print("added %s to %s" % (args.name, settings.users_file))


def require_user(users, name, path):
    if name not in users:
        raise Failure("no user %s in %s" % (quoted(name), path))


def command_passwd(args, settings):
    _, users = read_users_file(settings.users_file)
    require_user(users, args.name, settings.users_file)  # ask for no password that would be thrown away
    new_hash = hash_password(read_password(minimum=1 if args.allow_short else MIN_PASSWORD))

    def change(entries, users):
        require_user(users, args.name, settings.users_file)
        set_user(entries, args.name, hash=new_hash)

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
        print("%s\t%s%s" % (user.name, ",".join(user.groups), "\ttwo-factor" if user.totp else ""))


def read_code(prompt):
    """One line from the terminal or from standard input (scripts, tests)."""
    print(prompt, end="", flush=True)
    line = sys.stdin.readline() if sys.stdin is not None else ""
    if not line:
        raise Failure("no code on standard input; two-factor sign-in was not changed")
    return line.strip()


def enrol_in_terminal(name, issuer=None):
    """Show a new secret (QR code, URI, key) and return it once a current
    code from the user's app confirms that they hold it."""
    secret = new_totp_secret()
    uri = totp_uri(secret, name, issuer or TOTP_ISSUER_DEFAULT)
    print(qr_terminal(qr_matrix(uri)))
    print("Scan the QR code with an authenticator app, or add this key by hand (time-based, 6 digits):")
    print("  key: " + " ".join(secret[i:i + 4] for i in range(0, len(secret), 4)))
    print("  URI: " + uri)
    key = totp_key(secret)
    for _ in range(3):
        if totp_verify(key, read_code("Code shown by the app: "), time.time()) is not None:
            return secret
        print("That code does not match (is the phone's clock right?)", flush=True)
    raise Failure("no matching code; two-factor sign-in was not changed")


def command_totp(args, settings):
    """Enrol NAME in two-factor sign-in (replacing any secret), or --remove it.
    The user's sessions end either way: the line's fingerprint changes."""
    _, users = read_users_file(settings.users_file)
    require_user(users, args.name, settings.users_file)
    if args.remove and not users[args.name].totp:
        print("%s has no two-factor sign-in" % args.name)
        return 0
    secret = None if args.remove else enrol_in_terminal(args.name, args.issuer or settings.totp_issuer)

    def change(entries, users):
        require_user(users, args.name, settings.users_file)
        set_user(entries, args.name, totp=secret)

    edit_users_file(settings.users_file, change)
    print("two-factor sign-in %s for %s; their other sessions end" % ("removed" if args.remove else "enabled", args.name))
    return 0


def htpasswd_user(line, where, comment_as_groups, notes):
    """One htpasswd line -> User, or None with the reason added to NOTES.
    htpasswd's third field is a free-text comment, not groups: it is dropped
    (and said so) unless COMMENT_AS_GROUPS, or "ops:...:admin" would import
    an administrator."""
    name, _, rest = line.partition(":")
    password_hash, _, comment = rest.partition(":")
    if re.fullmatch(r"[./0-9A-Za-z]{13}", password_hash):
        notes.append("skipped %s: %s has a DES crypt hash (htpasswd -d), which keeps only 8 characters of a "
                     "password; add the user anew with 'authd.py adduser %s'" % (where, name, name))
        return None
    try:
        user = parse_user_line(":".join([name, password_hash] + ([comment] if comment_as_groups and comment else [])))
    except ValueError as e:
        notes.append("skipped %s: %s" % (where, e))
        return None
    if comment and not comment_as_groups:
        notes.append("note: %s: dropped the comment %s of %s (htpasswd's third field is a comment, not groups; "
                     "--comment-as-groups keeps it as groups)" % (where, quoted(comment), name))
    return user


def command_import_htpasswd(args, settings):
    """Merge an htpasswd file; lines keep their hashes (upgraded at login)."""
    try:
        with open(args.file, encoding="utf-8") as f:
            lines = f.read(MAX_USERS_FILE).splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise Failure("%s: cannot read: %s" % (args.file, getattr(e, "strerror", None) or e))
    added, notes = [], []

    def merge(entries, users):
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            where = "%s line %d" % (args.file, number)
            user = htpasswd_user(line, where, args.comment_as_groups, notes)
            if user is not None and user.name in users:
                notes.append("skipped %s: %s is already in %s" % (where, user.name, settings.users_file))
            elif user is not None:
                users[user.name] = user
                entries.append(user)
                added.append(user.name)

    edit_users_file(settings.users_file, merge)
    print("imported %d user(s) into %s%s" % (len(added), settings.users_file,
                                            (": " + ", ".join(added)) if added else ""))
    for line in notes:
        print(line)


def token_days(text):
    """--days: a positive number of days (fractions allowed), at most 100 years."""
    try:
        days = float(text)
    except ValueError:
        days = float("nan")
    if not 0 < days <= 36500:  # also refuses nan
        raise argparse.ArgumentTypeError("must be a number of days from 0 to 36500, such as 90 or 0.5")
    return days


def when(seconds):
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(seconds))


def command_token_add(args, settings):
    """Make a token, store its digest, print it (the only time it is shown)."""
    if args.label is not None and not TOKEN_LABEL_RE.fullmatch(args.label):
        raise Failure("bad label %s: 1 to 64 letters, digits, '.', '_' or '-'" % quoted(args.label))
    _, users = read_users_file(settings.users_file)
    require_user(users, args.name, settings.users_file)
    token, now = new_app_token(), int(time.time())
    expires = now + int(args.days * DAY) if args.days else 0

    def add(entries, tokens):
        taken = {t.label for t in tokens.values() if t.owner == args.name}
        label = args.label or next("token-%d" % i for i in itertools.count(1) if "token-%d" % i not in taken)
        if label in taken:
            raise Failure("%s already has a token labelled %s (revoke it, or choose another --label)"
                          % (args.name, label))
        if not entries:
            entries.extend(TOKENS_HEADER.splitlines())
        entries.append(AppToken(args.name, label, token_digest(token), now, expires, users[args.name].fingerprint))
        return label

    label = edit_users_file(settings.tokens_file, add, read_tokens_file)
    print(token)
    print("authd: app token %s of %s, %s, saved in %s. It is shown only this once: store it now."
          % (label, args.name, "expires " + when(expires) if expires else "no expiry", settings.tokens_file),
          file=sys.stderr)


def command_token_list(args, settings):
    _, users = read_users_file(settings.users_file)
    _, tokens = read_tokens_file(settings.tokens_file)
    shown = sorted((t for t in tokens.values() if args.name in (None, t.owner)), key=lambda t: (t.owner, t.created))
    if args.name is not None and not shown:
        require_user(users, args.name, settings.users_file)
    now = int(time.time())
    for t in shown:
        print("%s\t%s\tcreated %s\t%s\t%s" % (t.owner, t.label, when(t.created),
                                           "expires " + when(t.expires) if t.expires else "no expiry",
                                           t.status(users, now)))


def command_token_revoke(args, settings):
    def revoke(entries, tokens):
        found = [t for t in tokens.values() if t.owner == args.name and t.label == args.label]
        if not found:
            raise Failure("no token %s of %s in %s" % (quoted(args.label), quoted(args.name), settings.tokens_file))
        entries.remove(found[0])

    edit_users_file(settings.tokens_file, revoke, read_tokens_file)
    print("revoked token %s of %s" % (args.label, args.name))


def command_token(args, settings):
    return {"add": command_token_add, "list": command_token_list,
            "revoke": command_token_revoke}[args.action](args, settings)


def adduser_command(path):
    return "python3 authd.py adduser NAME --users %s" % shlex.quote(str(path))


def users_file_report(path, password=None):
    """(problems, warnings) of the users file at PATH, for check (PASSWORD:
    AUTH_PASSWORD's); notes are printed as it goes."""
    try:
        text = read_users_text(path)
    except UsersFileError as e:
        return e.problems, []
    if text is None and password:
        return [], ["%s does not exist; %s" % (path, password_mode_message(True, path))]
    if text is None:  # the server would start with no users: most likely a typo
        return ["%s does not exist (is the --users path or AUTH_USERS_FILE right?); to start it, add a user "
                "with: %s" % (path, adduser_command(path))], []
    warnings = plaintext_warnings(text, path)
    try:
        _, users = parse_users_text(text, path)
    except UsersFileError as e:
        return e.problems, warnings
    if password:
        warnings.append(password_mode_message(not users, path))
    elif not users:
        warnings.append("%s has no users yet; add one with: %s" % (path, adduser_command(path)))
    plaintext = [u.name for u in users.values() if is_plaintext(u.hash)]
    if plaintext:
        print("note: plaintext passwords for %s will be hashed when the server starts" % ", ".join(plaintext))
    return [], warnings


def print_report(problems, warnings):
    """check's verdict: every warning and every problem, then 0 or 1."""
    for warning in warnings:
        print("authd: warning: " + warning, file=sys.stderr)
    print_problems(problems)
    return 1 if problems else 0


def command_check(args, settings):
    problems = []
    try:
        load_secrets(settings, create=False)
    except Failure as e:
        if settings.token_secrets or os.path.lexists(settings.secret_file):
            problems.append(str(e))
    more, warnings = users_file_report(settings.users_file, settings.password)
    try:
        read_tokens_file(settings.tokens_file)
    except UsersFileError as e:
        more += e.problems
    if not settings.socket and exposed_host_warning(settings.host):
        warnings.insert(0, exposed_host_warning(settings.host))
    if print_report(problems + more, warnings):
        return 1
    print("ok: settings and %s are valid%s" % (settings.users_file, " (with warnings)" if warnings else ""))
    return 0


def command_serve(args, settings):
    keys = load_secrets(settings)
    store = UsersStore(settings.users_file)
    store.load()
    app = App(settings, keys, store)  # AUTH_PASSWORD's user, if any, comes with the settings
    if not store.users:
        log("warning", "no users yet: add one with: %s" % adduser_command(settings.users_file))
    app.tokens.load()
    try:
        sock, where = listening_socket(settings)
    except OSError as e:
        raise Failure("cannot listen on %s: %s" % (settings.socket or "%s:%d" % (settings.host, settings.port),
                                                  e.strerror or e))
    if sock.family != socket.AF_UNIX and exposed_host_warning(sock.getsockname()[0]):
        log("warning", exposed_host_warning(sock.getsockname()[0]))
    allow_open_files(settings.max_connections + 64)
    server = Server(app, sock, where)
    app.open_connections = lambda: len(server.connections)
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
    add.add_argument("--totp", action="store_true", help="enrol in two-factor sign-in (shows a QR code)")
    add.add_argument("--issuer", help="the name authenticator apps show (AUTH_TOTP_ISSUER, default authd)")
    totp = commands.add_parser("totp", parents=[common], help="enrol a user in two-factor sign-in (or --remove)")
    totp.add_argument("name")
    totp.add_argument("--remove", action="store_true", help="turn two-factor sign-in off")
    totp.add_argument("--issuer", help="the name authenticator apps show (AUTH_TOTP_ISSUER, default authd)")
    passwd = commands.add_parser("passwd", parents=[common], help="set a user's password")
    passwd.add_argument("name")
    for command in (add, passwd):
        command.add_argument("--allow-short", action="store_true",
                             help="accept a password shorter than %d characters" % MIN_PASSWORD)
    deluser = commands.add_parser("deluser", parents=[common], help="remove a user")
    deluser.add_argument("name")
    commands.add_parser("users", parents=[common], help="list users and groups (never hashes)")
    commands.add_parser("check", parents=[common], help="validate the settings and the users file")
    imp = commands.add_parser("import-htpasswd", parents=[common], help="merge an htpasswd file into the users file")
    imp.add_argument("file")
    imp.add_argument("--comment-as-groups", action="store_true",
                     help="keep each line's third field (an htpasswd comment) as the user's groups; "
                          "by default it is dropped")
    add_token_parser(commands, common)
    return parser


def add_token_parser(commands, common):
    token = commands.add_parser("token", help="app tokens for scripts and API clients: add, list, revoke")
    actions = token.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", parents=[common], help="make a token for user NAME and print it, once")
    add.add_argument("name")
    add.add_argument("--label", help="a name for the token, such as laptop or ci (default: token-N)")
    add.add_argument("--days", type=token_days, help="expire after this many days (default: never)")
    listing = actions.add_parser("list", parents=[common], help="list tokens (all, or NAME's), never the tokens")
    listing.add_argument("name", nargs="?")
    revoke = actions.add_parser("revoke", parents=[common], help="remove token LABEL of user NAME")
    revoke.add_argument("name")
    revoke.add_argument("label")


COMMANDS = {"serve": command_serve, "hash": command_hash, "adduser": command_adduser, "passwd": command_passwd,
            "deluser": command_deluser, "users": command_users, "check": command_check,
            "import-htpasswd": command_import_htpasswd, "token": command_token,
            "totp": command_totp}


def settings_from_args(args):
    flags = {"AUTH_HOST": getattr(args, "host", None), "AUTH_PORT": getattr(args, "port", None),
             "AUTH_USERS_FILE": args.users}
    return load_settings(flags, env_file=args.env, env_required=args.env is not None)


# ---------------------------------------------------------------------------
# Main: parse the command line, load the settings, run the command; every
# error an operator can cause ends as one line on stderr and an exit status.
# ---------------------------------------------------------------------------

def settings_failed(args, error):
    """Bad settings: list every problem, and every warning with them (check:
    the users file's too). The exit status: check 1, other commands 2."""
    problems, warnings = list(error.problems), list(error.warnings)
    if args.command == "check" and error.values.get("AUTH_USERS_FILE"):
        more, more_warnings = users_file_report(error.values["AUTH_USERS_FILE"], error.values.get("AUTH_PASSWORD"))
        problems, warnings = problems + more, warnings + more_warnings
    print_report(problems, warnings)
    return 1 if args.command == "check" else 2


def with_command(argv):
    """The command line with "serve" made explicit: it is the default."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["serve"] + argv
    return argv


def main(argv=None):
    args = build_parser().parse_args(with_command(list(sys.argv[1:] if argv is None else argv)))
    try:
        try:
            settings, warnings = settings_from_args(args)
        except SettingsError as e:
            return settings_failed(args, e)
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


# Python keeps the parse tree of the script it runs until the script returns:
# about 10 MiB for this file, for as long as the server runs. So the server
# runs this file again, in the same process (exec), with the code it compiled
# handed over in a pipe: the new image has no parse tree and compiles nothing
# (a compile peaks at 14 MiB, and the code objects left among that much freed
# memory keep some 0.75 MiB of it mapped). If the pipe cannot hold the code,
# the new image compiles the file itself. Same interpreter flags; the
# script's folder first on the import path, as for `python3 authd.py` (never
# the current folder, which `python3 -c` would put there). On glibc, with
# glibc's malloc for small objects too (PYTHONMALLOC=malloc, unless the
# operator set it): after a burst of connections, malloc_trim gives back
# every free page, where Python's own allocator frees only a wholly free
# 1 MiB arena, and the few objects that outlive a burst keep some 8 of them
# (8 MiB) mapped.
RUN_COMPILED = """import sys, os, marshal
if sys.path[:1] == [""]:
    sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[2]))
pipe = sys.argv.pop(1)
del sys.argv[0]
__file__, COMPILED = sys.argv[0], True
with open(__file__ if pipe == "-" else int(pipe), "rb") as source:
    code = compile(source.read(), __file__, "exec") if pipe == "-" else marshal.loads(source.read())
del pipe, source
exec(code)
"""
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; the name from Python 3.10


def compiled_pipe():
    """A pipe holding this file compiled, for the re-run; "-" if it cannot
    hold it (not Linux, or the code outgrew fs.pipe-max-size)."""
    with open(__file__, "rb") as f:
        data = marshal.dumps(compile(f.read(), __file__, "exec"))
    read_end, write_end = os.pipe()
    try:
        fcntl.fcntl(write_end, F_SETPIPE_SZ, len(data))
        os.set_blocking(write_end, False)
        written = os.write(write_end, data)
    except OSError:
        written = 0
    finally:
        os.close(write_end)
    if written != len(data):
        os.close(read_end)
        return "-"
    os.set_inheritable(read_end, True)
    return str(read_end)


def run_compiled():
    import subprocess
    flags = getattr(subprocess, "_args_from_interpreter_flags", list)()  # -X, -W, -O, -I...: what multiprocessing uses
    if MALLOC_TRIM is not None:
        os.environ.setdefault("PYTHONMALLOC", "malloc")
    os.execv(sys.executable, [sys.executable] + flags + ["-c", RUN_COMPILED, compiled_pipe()] + sys.argv)


if __name__ == "__main__":
    if with_command(sys.argv[1:])[0] == "serve" and not globals().get("COMPILED") and sys.executable:
        run_compiled()
    sys.exit(main())
