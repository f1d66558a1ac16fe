"""Sources of random bits for the samplers.

Three kinds, all exposing the same small interface (:class:`RandomSource`):

- ``secure_source()`` — the production default: an AES-256-CTR keystream (``cryptography``,
  AES-NI) under a fresh 256-bit key from ``os.urandom``. Nothing about it is stored.
- ``keyed_source(key, *labels)`` — the same keystream under a key derived with HMAC-SHA256 from
  a secret release key and the labels (e.g. run kind, level, shard): the noise of a shard is a
  pure function of (release key, labels), so a retried shard draws exactly the same noise. The
  release key lives only in the confidential run directory (file mode 0600, see
  :func:`create_key`), never in logs, parameters or manifests; ``repr`` never shows it.
- ``seeded_source(seed, *labels)`` — numpy PCG64 from a public seed: *not secret*, for tests and
  experiments only. ``source.kind == "seeded"`` and ``source.seed`` let the manifest record it.

A counter-mode keystream is a continuous stream: the bits returned do not depend on how the
requests were chunked, only on their order.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path

import numpy as np

from pipeline.errors import DptabError

KEY_BYTES = 32
_DOMAIN = b"dptab-noise-stream-v1"


class KeyFileError(DptabError, ValueError):
    """A release key file is missing, malformed, exists already, or is readable by others."""


class RandomSource:
    """A stream of uniform random bits; subclasses implement :meth:`_raw`.

    ``kind`` is ``"secure"``, ``"keyed"`` or ``"seeded"``; ``seed`` is the public seed of a
    seeded source (``None`` otherwise). ``uint64s_drawn`` counts the words consumed.
    """

    kind: str = "abstract"
    seed: int | None = None

    def __init__(self) -> None:
        self.uint64s_drawn = 0

    def _raw(self, n: int) -> np.ndarray:
        raise TypeError(f"{type(self).__name__} does not implement _raw")

    def uint64(self, n: int) -> np.ndarray:
        """``n`` independent uniform 64-bit words, numpy ``uint64`` of shape ``(n,)``."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.uint64s_drawn += n
        return self._raw(n)

    def getrandbits(self, k: int) -> int:
        """A uniform Python integer in ``[0, 2**k)`` (for the big-integer paths)."""
        if k <= 0:
            return 0
        words = self.uint64((k + 63) // 64)
        v = 0
        for w in words.tolist():
            v = (v << 64) | w
        return v >> (64 * len(words) - k)

    def randbelow(self, n: int) -> int:
        """A uniform Python integer in ``[0, n)`` by exact rejection (``n`` ≥ 1, any size)."""
        if n < 1:
            raise ValueError(f"randbelow needs n >= 1, got {n}")
        k = (n - 1).bit_length()
        while True:
            v = self.getrandbits(k)
            if v < n:
                return v

    def below(self, bounds: np.ndarray) -> np.ndarray:
        """Uniform int64 in ``[0, bounds[i])`` for each ``bounds[i]`` in ``[1, 2**62]``, exactly.

        Rejection on the smallest power-of-two mask covering the bound: each attempt succeeds
        with probability > 1/2 and the accepted value is exactly uniform.
        """
        b = np.asarray(bounds, dtype=np.int64)
        if b.size and (b.min() < 1 or b.max() > 2**62):
            raise ValueError("below() needs bounds in [1, 2**62]")
        m1 = (b - 1).astype(np.uint64)
        # exact bit length of b-1: float estimate, then fix off-by-one at powers of two
        bl = np.zeros(b.shape, dtype=np.int64)
        nz = m1 > 0
        bl[nz] = np.floor(np.log2(m1[nz].astype(np.float64))).astype(np.int64) + 1
        one = np.uint64(1)
        too_small = nz & ((m1 >> np.minimum(bl, 63).astype(np.uint64)) > 0)
        bl[too_small] += 1
        too_big = nz & (bl > 0) & ((m1 >> (bl - 1).astype(np.uint64)) == 0)
        bl[too_big] -= 1
        mask = np.where(bl > 0, (one << bl.astype(np.uint64)) - one, np.uint64(0))
        out = np.empty(b.shape, dtype=np.int64)
        todo = np.arange(b.size)
        while todo.size:
            u = self.uint64(todo.size) & mask[todo]
            ok = u < b[todo].astype(np.uint64)
            out[todo[ok]] = u[ok].astype(np.int64)
            todo = todo[~ok]
        return out

    def __repr__(self) -> str:
        extra = f", seed={self.seed}" if self.seed is not None else ""
        return f"{type(self).__name__}(kind={self.kind!r}{extra})"


class AesCtrSource(RandomSource):
    """AES-256 in counter mode under ``key`` (32 bytes): the keystream is the random stream."""

    def __init__(self, key: bytes, kind: str) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        super().__init__()
        if len(key) != KEY_BYTES:
            raise ValueError("AES-CTR source needs a 32-byte key")
        self.kind = kind
        self._enc = Cipher(algorithms.AES(key), modes.CTR(b"\x00" * 16)).encryptor()
        self._zeros = bytes(0)

    def _raw(self, n: int) -> np.ndarray:
        nbytes = 8 * n
        if len(self._zeros) < nbytes:
            self._zeros = bytes(max(nbytes, 1 << 16))
        # the keystream is AES-CTR applied to zeros; update_into needs len(out) >= len(in) + 15,
        # so write straight into a slightly longer numpy buffer (no copy)
        out = np.empty(n + 2, dtype=np.uint64)
        self._enc.update_into(memoryview(self._zeros)[:nbytes], memoryview(out).cast("B"))  # type: ignore[arg-type]  # numpy arrays are buffers
        return out[:n]


class SeededSource(RandomSource):
    """numpy PCG64 from a public seed (tests and experiments only; never for a release)."""

    kind = "seeded"

    def __init__(self, seed: int, labels: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.seed = int(seed)
        self.labels = labels
        entropy = [self.seed]
        if labels:
            digest = hashlib.sha256(_encode_labels(labels)).digest()
            entropy.append(int.from_bytes(digest[:16], "little"))
        self._bg = np.random.PCG64(np.random.SeedSequence(entropy))

    def _raw(self, n: int) -> np.ndarray:
        return self._bg.random_raw(n).astype(np.uint64, copy=False)

    def __repr__(self) -> str:
        return f"SeededSource(kind='seeded', seed={self.seed}, labels={self.labels!r})"


def _encode_labels(labels: tuple[object, ...]) -> bytes:
    """Unambiguous encoding of a label tuple (length-prefixed UTF-8)."""
    out = bytearray()
    for lab in labels:
        b = str(lab).encode()
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def secure_source() -> RandomSource:
    """The production source: AES-256-CTR keyed by 32 fresh bytes from ``os.urandom``."""
    return AesCtrSource(os.urandom(KEY_BYTES), kind="secure")


def keyed_source(key: bytes, *labels: object) -> RandomSource:
    """A reproducible secret stream: AES-256-CTR under HMAC-SHA256(key, labels).

    The same (key, labels) always gives the same bits; different labels give independent
    streams (as far as AES and HMAC are pseudorandom).
    """
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ValueError("keyed_source needs a secret key of at least 16 bytes")
    sub = hmac.new(bytes(key), _DOMAIN + _encode_labels(labels), hashlib.sha256).digest()
    return AesCtrSource(sub, kind="keyed")


def seeded_source(seed: int, *labels: object) -> RandomSource:
    """A *non-secret* seeded source (tests/experiments); labels derive independent sub-streams."""
    return SeededSource(seed, tuple(str(x) for x in labels))


def seeded_source_for(seed: int, *labels: object) -> RandomSource:
    """Alias of :func:`seeded_source` used by the run driver (seed, kind, level, shard)."""
    return seeded_source(seed, *labels)


def resolve_source(source: RandomSource | None) -> RandomSource:
    """``source`` itself, or a fresh :func:`secure_source` when ``None`` (the production default)."""
    if source is None:
        return secure_source()
    if not isinstance(source, RandomSource):
        raise TypeError(f"source must be a RandomSource (secure_source(), keyed_source(), "
                        f"seeded_source()), got {type(source).__name__}")
    return source


# --------------------------------------------------------------------------------------
# release key files


def create_key(path: str | Path) -> Path:
    """Create a new 32-byte release key file with mode 0600; refuses to overwrite one.

    Written to a temp file and linked into place, so a kill never leaves a partial key under
    the real name. Returns the path. The key itself is never returned, printed or logged.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists():
        raise KeyFileError(f"release key file already exists (never overwritten): {p}")
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # umask cannot widen it, but be explicit
        os.write(fd, os.urandom(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, p)  # fails if the name appeared meanwhile: never clobbers
    except FileExistsError:
        raise KeyFileError(f"release key file already exists (never overwritten): {p}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return p


def load_key(path: str | Path) -> bytes:
    """Read a release key file; refuses a file readable or writable by group/others."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise KeyFileError(f"release key file not found: {p}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"release key file {p} has mode {oct(st.st_mode & 0o777)}; must be 0600")
    key = p.read_bytes()
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"release key file {p} must hold {KEY_BYTES} bytes, holds {len(key)}")
    return key
