"""Two-factor codes (RFC 6238) and the QR codes that carry them to a phone.

Checked against outside references only: pyotp for codes and otpauth:// URIs,
RFC 6238's own test vectors, the QR standard's capacity and alignment tables
(typed here from ISO/IEC 18004, not produced by the code), and a real QR
decoder (zxing-cpp) reading the terminal rendering and the SVG as Chromium
draws it. Test-only packages: pyotp, zxing-cpp, playwright (+ /usr/bin/chromium).
"""
import base64
import os
import re
import struct
import urllib.parse
import xml.etree.ElementTree as ET
import zlib

import pytest

from conftest import ARTIFACTS

import authd

# ---------------------------------------------------------------------------
# codes
# ---------------------------------------------------------------------------

# RFC 6238 Appendix B, SHA-1 column (8 digits there; a 6-digit code is the last 6).
RFC6238_KEY = b"12345678901234567890"
RFC6238_VECTORS = [(59, "94287082"), (1111111109, "07081804"), (1111111111, "14050471"),
                   (1234567890, "89005924"), (2000000000, "69279037"), (20000000000, "65353130")]


@pytest.mark.parametrize("when,code8", RFC6238_VECTORS)
def test_rfc6238_vectors(when, code8):
    assert authd.totp_code(RFC6238_KEY, when // 30) == code8[-6:]
    assert authd.totp_verify(RFC6238_KEY, code8[-6:], when) == when // 30


def test_pyotp_codes_accepted_at_the_step_and_its_neighbours_only(pyotp):
    for _ in range(5):
        secret = authd.new_totp_secret()
        key = authd.totp_key(secret)
        reference = pyotp.TOTP(secret)
        now = 1_700_000_000 + secrets_below(10 ** 6)
        step = now // 30
        for offset in (-1, 0, 1):
            code = reference.at(now + 30 * offset)
            assert authd.totp_verify(key, code, now) == step + offset
        for offset in (-3, -2, 2, 3):
            code = reference.at(now + 30 * offset)
            # a code two steps away may coincide with a nearby one by chance (1 in 10^6 per step)
            if all(code != reference.at(now + 30 * near) for near in (-1, 0, 1)):
                assert authd.totp_verify(key, code, now) is None


def secrets_below(n):
    return int.from_bytes(os.urandom(4), "big") % n


def test_step_boundaries(pyotp):
    secret = authd.new_totp_secret()
    key = authd.totp_key(secret)
    code = pyotp.TOTP(secret).at(30 * 1000)  # valid for [30000, 30030)
    assert authd.totp_verify(key, code, 30 * 1000 + 29.999) == 1000
    assert authd.totp_verify(key, code, 30 * 1001 + 29.999) == 1000  # one step later: neighbour
    assert authd.totp_verify(key, code, 30 * 999) == 1000  # one step earlier: neighbour
    if code not in (pyotp.TOTP(secret).at(30 * k) for k in (1001, 1002, 1003)):
        assert authd.totp_verify(key, code, 30 * 1002) is None


@pytest.mark.parametrize("bad", ["", "12345", "1234567", "12345a", " 12 34 5", "\u0661\u0662\u0663\u0664\u0665\u0666",
                                 "１２３４５６", None, b"123456", 123456, "123456\x00"])
def test_malformed_codes_refused(bad):
    key = authd.totp_key(authd.new_totp_secret())
    assert authd.totp_verify(key, bad, 1_700_000_000) is None


def test_code_with_spaces_is_read(pyotp):
    secret = authd.new_totp_secret()
    code = pyotp.TOTP(secret).at(1_700_000_000)
    assert authd.totp_verify(authd.totp_key(secret), " %s %s " % (code[:3], code[3:]), 1_700_000_000) is not None


def test_new_secret_is_160_random_bits_in_base32(pyotp):
    seen = set()
    for _ in range(50):
        secret = authd.new_totp_secret()
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert len(base64.b32decode(secret)) == 20
        seen.add(secret)
        pyotp.TOTP(secret).now()  # the reference library takes it
    assert len(seen) == 50


def test_secret_parsing():
    secret = authd.new_totp_secret()
    key = base64.b32decode(secret)
    spaced = " ".join(secret[i:i + 4] for i in range(0, 32, 4)).lower()
    assert authd.totp_key(spaced) == key
    assert authd.totp_key("JBSWY3DPEHPK3PXP") == b"Hello!\xde\xad\xbe\xef"  # 80 bits: the minimum
    for bad in ("", "JBSWY3DP", "JBSWY3DPEHPK3PX1", "not base32!", "JBSWY3DPEHPK3PX"):
        with pytest.raises(ValueError):
            authd.totp_key(bad)


# ---------------------------------------------------------------------------
# otpauth:// URI
# ---------------------------------------------------------------------------

NAMES = [  # (account, issuer)
    ("alice", "authd"),
    ("a", "x"),
    ("bob.smith@example.com", "Example Intranet"),
    ("mary ann", "ops: admin portal"),
    ("x" * 64, "A very long issuer name for an internal site " * 3),
    ("jürgen", "Café Zoë & Søn — Büro"),
    ("o'neil+test", "100% sure?/#&="),
    ("日本語ユーザー", "Ελληνικά"),
]


@pytest.mark.parametrize("account,issuer", NAMES)
def test_uri_parses_in_pyotp_to_the_same_values(pyotp, account, issuer):
    secret = authd.new_totp_secret()
    uri = authd.totp_uri(secret, account, issuer)
    parsed = pyotp.parse_uri(uri)
    assert isinstance(parsed, pyotp.TOTP)
    assert (parsed.secret, parsed.name, parsed.issuer) == (secret, account, issuer)
    assert (parsed.digits, parsed.interval, parsed.digest().name) == (6, 30, "sha1")
    assert authd.totp_verify(authd.totp_key(secret), parsed.at(1_700_000_000), 1_700_000_000) is not None


@pytest.mark.parametrize("account,issuer", NAMES)
def test_uri_is_plain_ascii_with_one_literal_colon_in_the_label(account, issuer):
    uri = authd.totp_uri("JBSWY3DPEHPK3PXP", account, issuer)
    assert uri.isascii() and " " not in uri and "+" not in uri
    scheme_host, _, rest = uri.partition("//totp/")
    assert scheme_host == "otpauth:"
    label, _, query = rest.partition("?")
    assert label.count(":") == 1
    assert [urllib.parse.unquote(part) for part in label.split(":")] == [issuer, account]
    assert urllib.parse.parse_qs(query) == {
        "secret": ["JBSWY3DPEHPK3PXP"], "issuer": [issuer], "algorithm": ["SHA1"],
        "digits": ["6"], "period": ["30"]}


# ---------------------------------------------------------------------------
# QR: sizes from the standard's tables
# ---------------------------------------------------------------------------

# ISO/IEC 18004 Table 7: data capacity in byte mode at error correction level M,
# versions 1 to 40.
BYTE_CAPACITY_M = [
    14, 26, 42, 62, 84, 106, 122, 152, 180, 213, 251, 287, 331, 362, 412, 450, 504, 560, 624, 666,
    711, 779, 857, 911, 997, 1059, 1125, 1190, 1264, 1370, 1452, 1538, 1628, 1722, 1809, 1911,
    1989, 2099, 2213, 2331]

# ISO/IEC 18004 Annex E: row/column coordinates of alignment pattern centres.
ALIGNMENT = {1: [], 2: [6, 18], 6: [6, 34], 7: [6, 22, 38], 14: [6, 26, 46, 66], 15: [6, 26, 48, 70],
             22: [6, 26, 50, 74, 98], 32: [6, 34, 60, 86, 112, 138],
             36: [6, 24, 50, 76, 102, 128, 154], 40: [6, 30, 58, 86, 114, 142, 170]}


@pytest.mark.parametrize("version", range(1, 41))
def test_smallest_version_that_holds_the_data(version):
    capacity = BYTE_CAPACITY_M[version - 1]
    assert authd.qr_smallest_version(capacity) == version
    if version < 40:
        assert authd.qr_smallest_version(capacity + 1) == version + 1
    if version > 1:
        assert authd.qr_smallest_version(BYTE_CAPACITY_M[version - 2] + 1) == version


def test_too_long_for_any_version():
    with pytest.raises(ValueError):
        authd.qr_matrix("x" * 2332)


@pytest.mark.parametrize("version", sorted(ALIGNMENT))
def test_alignment_positions(version):
    assert authd._qr_alignment_positions(version) == ALIGNMENT[version]


# ---------------------------------------------------------------------------
# QR: decoded by a real decoder
# ---------------------------------------------------------------------------

def decode(zxing, grey):
    """Texts of the QR codes zxing-cpp finds in a grey image (rows of bytes), and
    zxing's reading details. Inverted (light-on-dark) codes are not searched for
    where zxing-cpp lets us say so: many phone apps do not find them either."""
    formats = zxing.BarcodeFormat.QRCode
    try:
        found = zxing.read_barcodes(grey, formats=formats, try_invert=False)
    except TypeError:  # zxing-cpp 2.x (the last release for Python 3.9) has no try_invert
        found = zxing.read_barcodes(grey, formats=formats)
    return [(code.text, getattr(code, "extra", None) or {}) for code in found]


def image(rows, scale):
    """A grey image (0 = black, 255 = white) from rows of grey levels, each pixel scaled up."""
    data = bytearray()
    for row in rows:
        line = b"".join(bytes((level,)) * scale for level in row)
        data += line * scale
    return memoryview(bytes(data)).cast("B", (len(rows) * scale, len(rows[0]) * scale))


def assert_decodes_exactly(zxing, grey, text, version=None):
    found = decode(zxing, grey)
    assert [t for t, _ in found] == [text]
    extra = found[0][1]
    if "UEC" in extra:  # zxing-cpp 3: share of error correction left unused; 1.0: no codeword was wrong
        assert extra["UEC"] == 1.0
        assert extra["ECLevel"] == "M"
        if version is not None:
            assert extra["Version"] == str(version)


@pytest.mark.parametrize("version", range(1, 41))
def test_every_version_decodes_without_a_single_error(zxing, version):
    """Filled to the standard's capacity: the data, the padding, the block split
    and interleaving and the format and version information all read back."""
    text = ("v%d|" % version + "0123456789abcdefghijklmnopqrstuvwxyz" * 70)[:BYTE_CAPACITY_M[version - 1]]
    modules = authd.qr_matrix(text)
    assert len(modules) == 17 + 4 * version
    rows = [[0 if dark else 255 for dark in row] for row in authd.qr_with_quiet_zone(modules)]
    assert_decodes_exactly(zxing, image(rows, 3), text, version)


def test_same_symbol_as_zxing_encoder(zxing):
    """zxing-cpp also encodes: for byte-mode text at level M it must choose the
    same version and the same mask (the standard's penalty rules) module for module."""
    for length in (1, 13, 14, 15, 40, 100, 181, 500, 1060, 2331):
        text = "".join("abcdefghijklmnopqrstuvwxyz:/?=&%"[(i * 7 + length) % 32] for i in range(length))
        reference = zxing.create_barcode(text, zxing.BarcodeFormat.QRCode, ec_level="M")
        try:
            picture = reference.to_image(scale=1, add_quiet_zones=False)
        except TypeError:  # zxing-cpp 2.3 (Python 3.9): one pixel per module by default
            picture = reference.to_image(with_quiet_zones=False)
        pixels = memoryview(picture)
        size = picture.shape[0]
        expected = [[pixels[y, x] < 128 for x in range(size)] for y in range(size)]
        assert authd.qr_matrix(text) == expected, length


def uri_of_version_at_least(minimum):
    """A real otpauth URI whose QR code needs at least this version: long names."""
    account, issuer = "alice", "authd"
    while authd.qr_smallest_version(len(authd.totp_uri("A" * 32, account, issuer).encode())) < minimum:
        account += " Zoë"
        issuer += " Büro"
    return authd.totp_uri(authd.new_totp_secret(), account, issuer)


URIS = {
    "short": lambda: authd.totp_uri(authd.new_totp_secret(), "alice", "authd"),
    "v10+": lambda: uri_of_version_at_least(10),
    "v27+": lambda: uri_of_version_at_least(27),
}
MINIMUM_VERSION = {"short": 1, "v10+": 10, "v27+": 27}


# A terminal: default colours for text and background, and how it shows the
# eight base colours (SGR 30-37 / 40-47), as grey levels.
THEMES = {
    "dark": {"fg": 220, "bg": 28, "palette": [46, 204, 78, 193, 114, 117, 120, 211]},
    "light": {"fg": 36, "bg": 250, "palette": [0, 205, 0, 205, 0, 205, 0, 229]},
}


def terminal_pixels(text, theme, margin=6):
    """What a terminal shows, one pixel per half character cell (a cell is twice
    as high as wide), honouring SGR colour escapes; the terminal's own
    background around the text (MARGIN cells)."""
    colours = THEMES[theme]
    lines = text.rstrip("\n").split("\n")
    width = max(len(re.sub(r"\x1b\[[0-9;]*m", "", line)) for line in lines) + 2 * margin
    rows = [[colours["bg"]] * width for _ in range(2 * margin)]
    for line in lines:
        fg, bg = colours["fg"], colours["bg"]
        top, bottom = [colours["bg"]] * margin, [colours["bg"]] * margin
        for escape, char in re.findall(r"\x1b\[([0-9;]*)m|(.)", line):
            if char:
                top.append(fg if char in "\u2580\u2588" else bg)
                bottom.append(fg if char in "\u2584\u2588" else bg)
                continue
            for code in (int(c or 0) for c in escape.split(";")):
                if code == 0:
                    fg, bg = colours["fg"], colours["bg"]
                elif 30 <= code <= 37:
                    fg = colours["palette"][code - 30]
                elif 40 <= code <= 47:
                    bg = colours["palette"][code - 40]
        for row in (top, bottom):
            rows.append(row + [colours["bg"]] * (width - len(row)))
    rows += [[colours["bg"]] * width for _ in range(2 * margin)]
    return rows


@pytest.mark.parametrize("theme", sorted(THEMES))
@pytest.mark.parametrize("kind", sorted(URIS))
def test_terminal_rendering_decodes_on_dark_and_light_terminals(zxing, kind, theme):
    uri = URIS[kind]()
    modules = authd.qr_matrix(uri)
    assert len(modules) >= 17 + 4 * MINIMUM_VERSION[kind]
    text = authd.qr_terminal(modules)
    rows = terminal_pixels(text, theme)
    # dark on light, whatever the theme: the centre of the top-left finder pattern
    # (3 modules in from the 4-module quiet zone, below the 6-cell margin) is darker
    # than the quiet zone beside it
    finder, quiet = rows[12 + 4 + 3][6 + 4 + 3], rows[12 + 4 + 3][6 + 1]
    assert finder < 100 < quiet
    assert_decodes_exactly(zxing, image(rows, 3), uri)


def test_terminal_text_shape():
    modules = authd.qr_matrix("otpauth://totp/authd:alice?secret=JBSWY3DPEHPK3PXP")
    lines = authd.qr_terminal(modules).rstrip("\n").split("\n")
    assert len(lines) == (len(modules) + 8 + 1) // 2
    for line in lines:
        assert line.startswith("\x1b[30;47m") and line.endswith("\x1b[0m")
        body = line[len("\x1b[30;47m"):-len("\x1b[0m")]
        assert len(body) == len(modules) + 8
        assert set(body) <= {" ", "\u2580", "\u2584", "\u2588"}
    assert set(lines[0][8:-4]) == {" "} and set(lines[1][8:-4]) == {" "}  # quiet zone: 4 light rows


def test_without_the_colour_escapes_a_dark_terminal_would_show_it_inverted(zxing):
    """Why the explicit colours matter, and proof that the checks above can fail:
    the bare half blocks on a dark terminal put light ink where modules are dark."""
    modules = authd.qr_matrix("otpauth://totp/authd:alice?secret=JBSWY3DPEHPK3PXP")
    bare = re.sub(r"\x1b\[[0-9;]*m", "", authd.qr_terminal(modules))
    rows = terminal_pixels(bare, "dark")
    assert rows[12 + 4 + 3][6 + 4 + 3] > rows[12 + 4 + 3][6 + 1]  # finder centre lighter than the quiet zone
    if "try_invert" in (zxing.read_barcodes.__doc__ or ""):
        assert decode(zxing, image(rows, 3)) == []


# ---------------------------------------------------------------------------
# QR: SVG, drawn by Chromium under a strict CSP
# ---------------------------------------------------------------------------

def test_svg_markup():
    modules = authd.qr_matrix("otpauth://totp/authd:alice?secret=JBSWY3DPEHPK3PXP")
    svg = authd.qr_svg(modules, 'QR code for "alice" <&>')
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == ns + "svg"
    size = len(modules) + 8
    assert root.get("viewBox") == "0 0 %d %d" % (size, size)
    assert root.get("shape-rendering") == "crispEdges"
    assert root.get("aria-label") == 'QR code for "alice" <&>'
    assert [child.tag for child in root] == [ns + "rect", ns + "path"]
    assert root[0].get("fill") == "#fff" and root[1].get("fill") == "#000"
    for forbidden in ("style", "script", "href", "url(", "<image", "foreignObject", "on"):
        assert not re.search(r"[\s<]%s" % re.escape(forbidden), svg, re.I), forbidden


def png_grey(data):
    """Grey rows (green channel) of an 8-bit RGB or RGBA PNG, as Chromium writes them."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, compressed = 8, b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            compressed += body
        position += 12 + length
    assert depth == 8 and colour in (2, 6) and interlace == 0
    channels = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(compressed), width * channels
    previous, rows = bytearray(stride), []
    for y in range(height):
        start = y * (stride + 1)
        line = unfilter(raw[start], bytearray(raw[start + 1:start + 1 + stride]), previous, channels)
        rows.append(list(line[1::channels]))
        previous = line
    return rows


def unfilter(kind, line, previous, step):
    """Undo one PNG row filter (None, Sub, Up, Average, Paeth)."""
    for i in range(len(line)):
        left = line[i - step] if i >= step else 0
        up, corner = previous[i], previous[i - step] if i >= step else 0
        if kind == 1:
            line[i] = (line[i] + left) & 255
        elif kind == 2:
            line[i] = (line[i] + up) & 255
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 255
        elif kind == 4:
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
    return line


PAGE_STYLE = ("body{margin:0;padding:24px;background:#fff;color:#111}"
              "@media (prefers-color-scheme: dark){body{background:#121212;color:#eee}}")


def screenshot_svg(browser, svg, scheme, name):
    """Serve a page holding SVG under the pages' strict CSP (answered by Playwright
    itself: no network), and return a PNG screenshot of the drawn SVG."""
    import hashlib
    style_hash = base64.b64encode(hashlib.sha256(PAGE_STYLE.encode()).digest()).decode()
    csp = "default-src 'none'; style-src 'sha256-%s'; frame-ancestors 'none'" % style_hash
    body = "<!doctype html><html><head><style>%s</style></head><body><p>Scan:</p>%s</body></html>" % (
        PAGE_STYLE, svg)
    context = browser.new_context(color_scheme=scheme, viewport={"width": 1000, "height": 1000})
    try:
        page = context.new_page()
        problems = []
        page.on("console", lambda message: problems.append(message.text))
        page.route("http://127.0.0.1:9/**", lambda route: route.fulfill(
            status=200, body=body, headers={"Content-Type": "text/html; charset=utf-8",
                                            "Content-Security-Policy": csp}))
        page.goto("http://127.0.0.1:9/qr")
        assert page.evaluate("getComputedStyle(document.body).backgroundColor") == (
            "rgb(18, 18, 18)" if scheme == "dark" else "rgb(255, 255, 255)")  # the hashed style applies
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / name))
        shot = page.locator("svg").screenshot()
        assert problems == []  # no CSP violation reported
        return shot
    finally:
        context.close()


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("kind", sorted(URIS))
def test_svg_drawn_by_chromium_decodes(zxing, browser, kind, scheme):
    uri = URIS[kind]()
    modules = authd.qr_matrix(uri)
    assert len(modules) >= 17 + 4 * MINIMUM_VERSION[kind]
    svg = authd.qr_svg(modules, "QR code", pixels_per_module=3)
    shot = screenshot_svg(browser, svg, scheme, "qr-svg-%s-%s.png" % (kind, scheme))
    rows = png_grey(shot)
    assert len(rows) == 3 * (len(modules) + 8)
    # padding around the screenshot: the page's own background (dark in dark mode)
    page_level = 18 if scheme == "dark" else 255
    padded = [[page_level] * (len(rows[0]) + 24) for _ in range(12)]
    padded[6:6] = [[page_level] * 12 + row + [page_level] * 12 for row in rows]
    assert_decodes_exactly(zxing, image(padded, 1), uri)
