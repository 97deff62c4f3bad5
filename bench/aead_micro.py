"""Record protection microbenchmark: records/s and MB/s for 1400-byte records, per CPU-second.

    python -m bench.aead_micro [--seconds S] [--size N] [--batch B] [--json]

Compares, for both suites: cryptography's AEAD .encrypt per record (what the pure-Python
RecordKey does, plus its header packing), RecordKey.seal (pure Python and through C),
stcp._aead RecordCipher.seal per record, seal_stream (a bulk run into one buffer, what the
send path does), and the receive side open per record / open_records (a bulk run, what the
receive path does). MB/s counts plaintext bytes. Not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from stcp import _aead, crypto, wire

SUITE_NAMES = {wire.SUITE_AES_256_GCM: "aes-256-gcm", wire.SUITE_CHACHA20_POLY1305: "chacha20-poly1305"}


def run(fn, records_per_call: int, seconds: float) -> float:
    """Records per CPU-second of fn() (process time, so other load on the host counts less),
    best of three slices."""
    fn()
    best = 0.0
    for _ in range(3):
        n, start, cpu0 = 0, time.perf_counter(), time.process_time()
        deadline = start + seconds / 3
        while True:
            for _ in range(8):
                fn()
            n += 8
            if time.perf_counter() >= deadline:
                break
        best = max(best, n * records_per_call / (time.process_time() - cpu0))
    return best


def bench_suite(suite: int, size: int, batch: int, seconds: float) -> dict:
    secret = os.urandom(32)
    py_key = crypto.RecordKey(suite, secret)
    c_key = crypto.RecordKey(suite, secret)
    py_key.fast = None
    aead = (AESGCM if suite == wire.SUITE_AES_256_GCM else ChaCha20Poly1305)(py_key.key)
    rc = _aead.RecordCipher(suite, py_key.key, py_key.iv)
    pt = os.urandom(size)
    pts = [os.urandom(size) for _ in range(batch)]
    header = wire.pack_header(size + 16, 1, 1)
    nonce = bytes(12)
    chunk = size - wire.STREAM_FRAME_OVERHEAD     # records of `size` plaintext bytes, frame included
    data = b"".join(pts)[:batch * chunk]
    seg = wire.HEADER_LEN + size + wire.AEAD_TAG_LEN
    run_records = [(rc.seal_stream(1, 1, data, 0, chunk, False), seg)]
    ct = aead.encrypt(nonce, pt, header)
    one = rc.seal(1, 1, pt)
    seq = [1]

    def c_seal():
        seq[0] += 1
        rc.seal(1, seq[0], pt)

    def c_key_seal():
        seq[0] += 1
        c_key.seal(1, seq[0], pt)

    def py_key_seal():
        seq[0] += 1
        py_key.seal(1, seq[0], pt)

    def c_stream():
        seq[0] += batch
        rc.seal_stream(1, seq[0], data, 0, chunk, False)

    cases = {
        "cryptography AEAD.encrypt per record": (lambda: aead.encrypt(nonce, pt, header), 1),
        "RecordKey.seal, pure Python": (py_key_seal, 1),
        "RecordKey.seal, via C": (c_key_seal, 1),
        "RecordCipher.seal per record": (c_seal, 1),
        f"RecordCipher.seal_stream x{batch}": (c_stream, batch),
        "cryptography AEAD.decrypt per record": (lambda: aead.decrypt(nonce, ct, header), 1),
        "RecordCipher.open per record": (lambda: rc.open(one), 1),
        f"RecordCipher.open_records x{batch}": (lambda: rc.open_records(run_records, 1, 0, -1, 1 << 62), batch),
    }
    res = {}
    for name, (fn, per) in cases.items():
        rps = run(fn, per, seconds)
        res[name] = {"records_per_s": rps, "MB_per_s": rps * size / 1e6}
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="time per case")
    ap.add_argument("--size", type=int, default=1400, help="plaintext bytes per record")
    ap.add_argument("--batch", type=int, default=64, help="records per bulk call")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = {SUITE_NAMES[s]: bench_suite(s, args.size, args.batch, args.seconds) for s in SUITE_NAMES}
    meta = {"size": args.size, "batch": args.batch, "openssl": _aead.OPENSSL_VERSION,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if args.json:
        print(json.dumps({"meta": meta, "results": results}, indent=2))
        return
    print(f"record protection, {args.size}-byte plaintexts, one thread, per CPU-second; {meta['openssl']}, "
          f"Python {meta['python']}")
    for suite, rows in results.items():
        print(f"\n{suite}")
        for name, r in rows.items():
            print(f"  {name:40s} {r['records_per_s'] / 1e3:9.0f} k rec/s  {r['MB_per_s']:8.0f} MB/s")


if __name__ == "__main__":
    main()
