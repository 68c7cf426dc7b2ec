#!/usr/bin/env python3
"""An independent implementation of the colcrypt-file format, written from
docs/format.md ("Files") alone, with Python's `cryptography` (Debian's
python3-cryptography). The integration tests use it to check that the format
document is complete and that colcrypt-file follows it, both ways.

  colcrypt_file.py decrypt CONTEXT < IN > OUT
  colcrypt_file.py encrypt CONTEXT KEY_ID_HEX VERSION CHUNK_SIZE < IN > OUT

The version key (64 hex digits) is read from $COLCRYPT_VERSION_KEY, never
from the command line. Exit 0 on success, 1 when the input does not verify
(nothing is written then: this tool buffers the whole output, as a test tool
may).
"""
import os
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"\x89CCF\r\n\x1a\n"
HEADER = 128
TAG = 16


def chunk_key(data_key, header):
    salt = header[36:68]
    info = b"colcrypt-file v1 chunk key" + header[0:32]
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(data_key)


def nonce(index, final):
    return b"\x00\x00\x00" + struct.pack(">Q", index) + (b"\x01" if final else b"\x00")


def decrypt(data, version_key, context):
    if len(data) < HEADER or data[0:8] != MAGIC or data[8] != 1 or data[9] != 1:
        raise ValueError("not a version 1 colcrypt-file file")
    header = data[:HEADER]
    if header[10:12] != b"\x00\x00":
        raise ValueError("reserved bytes")
    (chunk_size,) = struct.unpack(">I", header[12:16])
    data_key = AESGCM(version_key).decrypt(header[68:80], header[80:128], header[0:68] + context)
    aead = AESGCM(chunk_key(data_key, header))
    body, out, index, pos = data[HEADER:], [], 0, 0
    record = chunk_size + TAG
    while True:
        rest = len(body) - pos
        final = rest <= record
        if rest < TAG:
            raise ValueError("truncated")
        out.append(aead.decrypt(nonce(index, final), body[pos:pos + min(rest, record)], b""))
        if final:
            return b"".join(out)
        pos += record
        index += 1


def encrypt(data, version_key, context, key_id, version, chunk_size):
    header = bytearray(MAGIC + bytes([1, 1, 0, 0]) + struct.pack(">I", chunk_size) + key_id +
                       struct.pack(">I", version) + os.urandom(32))
    data_key, wrap_nonce = os.urandom(32), os.urandom(12)
    wrapped = AESGCM(version_key).encrypt(wrap_nonce, data_key, bytes(header) + context)
    header += wrap_nonce + wrapped
    aead = AESGCM(chunk_key(data_key, bytes(header)))
    chunks = [data[i:i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]
    out = [bytes(header)]
    for index, chunk in enumerate(chunks):
        out.append(aead.encrypt(nonce(index, index == len(chunks) - 1), chunk, b""))
    return b"".join(out)


def main():
    version_key = bytes.fromhex(os.environ["COLCRYPT_VERSION_KEY"])
    data = sys.stdin.buffer.read()
    command, context = sys.argv[1], sys.argv[2].encode()
    try:
        if command == "decrypt":
            result = decrypt(data, version_key, context)
        else:
            result = encrypt(data, version_key, context, bytes.fromhex(sys.argv[3]),
                             int(sys.argv[4]), int(sys.argv[5]))
    except Exception as e:  # InvalidTag, ValueError: the input does not verify
        print("colcrypt_file.py: %s: %s" % (type(e).__name__, e), file=sys.stderr)
        return 1
    sys.stdout.buffer.write(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
