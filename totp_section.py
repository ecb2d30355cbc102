"""Two-factor codes and QR codes for authd, written to be pasted into authd.py.

Until then this module stands alone so that it can be tested on its own.
"""

import base64
import hashlib
import hmac
import html
import secrets
import struct
import urllib.parse


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
    digest = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F  # "dynamic truncation"
    number = struct.unpack(">I", digest[offset:offset + 4])[0] & 0x7FFFFFFF
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

def _qr_draw_finder(modules, reserved, centre_x, centre_y):
    """A 7x7 finder pattern with its light separator ring (clipped at the edges)."""
    size = len(modules)
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            x, y = centre_x + dx, centre_y + dy
            if 0 <= x < size and 0 <= y < size:
                modules[y][x] = max(abs(dx), abs(dy)) not in (2, 4)
                reserved[y][x] = True


def _qr_draw_alignment(modules, reserved, centre_x, centre_y):
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            modules[centre_y + dy][centre_x + dx] = max(abs(dx), abs(dy)) != 1
            reserved[centre_y + dy][centre_x + dx] = True


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
        _qr_draw_finder(modules, reserved, x, y)
    centres = _qr_alignment_positions(version)
    corners = {(6, 6), (6, centres[-1] if centres else 0), (centres[-1] if centres else 0, 6)}
    for y in centres:
        for x in centres:
            if (x, y) not in corners:  # these would overlap a finder pattern
                _qr_draw_alignment(modules, reserved, x, y)
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
