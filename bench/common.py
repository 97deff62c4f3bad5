"""Shared pieces of the benchmark peers: argument parsing, the tiny wire protocol the
peers speak on top of each transport, statistics and the one-JSON-line client output.

Every peer is a module `bench.peers.<name>` with two roles:

    python -m bench.peers.<name> server --listen HOST:PORT [--cert C --key K]
    python -m bench.peers.<name> client --connect HOST:PORT --test bulk|bulk8|handshake|rtt ...

The server prints one line `READY <port>` on stdout once it listens, then serves until
killed. The client runs one test and prints exactly one JSON line on stdout.

On each connection (or stream) the first byte names what the client wants:
  b"S"  sink: then frames of u32 BE length + that many bytes; a zero length ends the
        transfer and the server answers with the payload byte count (u64 BE).  Used by
        the bulk tests.  Framing rather than half-close because TLS over Python's ssl has
        no half-close; every peer uses the same framing so the application work is equal.
  b"E"  echo: everything after the mode byte is sent back until end of stream.
Handshake-only connections send nothing and close right after the handshake.

The flood benches (bench.xdp_flood, bench.hello_flood) share the last section: building
their C sender and writing the report.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

MODE_SINK = b"S"
MODE_ECHO = b"E"
COUNT_LEN = 8

BULK_CHUNK = 256 * 1024      # application write size for bulk
RTT_SIZE = 64                # echo message size (bench.run also measures 1 KB and 16 KB: --size)
RTT_WARMUP = 50


# ----------------------------------------------------------------------------- args

def split_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    host = host.strip("[]")
    return host, int(port)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True, help="HOST:PORT (port 0 picks one)")
    s.add_argument("--cert")
    s.add_argument("--key")
    s.add_argument("--client-ca", help="mutual TLS: the CA client certificates must chain to")
    s.add_argument("--stcp-keys", metavar="DIR", help="STCP: the run's keys (bench.common.make_credentials)")
    c = sub.add_parser("client")
    c.add_argument("--connect", required=True, help="HOST:PORT")
    c.add_argument("--test", required=True, choices=["bulk", "bulk8", "handshake", "rtt", "capacity", "load"])
    c.add_argument("--cafile", help="the CA to trust (the run's throwaway CA, which signed the server's cert)")
    c.add_argument("--client-cert", help="mutual TLS: the client's certificate")
    c.add_argument("--client-key", help="mutual TLS: the client's private key")
    c.add_argument("--stcp-keys", metavar="DIR", help="STCP: the run's keys (bench.common.make_credentials)")
    c.add_argument("--bytes", type=int, default=256 * 1024 * 1024, help="bulk: bytes to send")
    c.add_argument("--duration", type=float, default=10.0,
                   help="bulk: stop sending after this many seconds even if --bytes is not reached")
    c.add_argument("--connections", type=int, default=8,
                   help="bulk8: concurrent connections sharing --bytes and --duration")
    c.add_argument("--count", type=int, default=300, help="handshake/rtt: iterations")
    c.add_argument("--size", type=int, default=RTT_SIZE, help="rtt: message size in bytes (a multiple of 8)")
    c.add_argument("--time-limit", type=float, default=60.0,
                   help="handshake/rtt: stop early after this many seconds")
    c.add_argument("--clients", type=int, default=32,
                   help="capacity/load: concurrent clients, each for --duration seconds")
    return p


# ----------------------------------------------------------------------------- event loop

def loop_name() -> str:
    """The event loop the asyncio peers run on: $BENCH_LOOP (asyncio or uvloop; bench.run sets
    uvloop for its *_uvloop peers), the same for server and client and for STCP and TLS, so a
    ratio compares transports on one loop."""
    name = os.environ.get("BENCH_LOOP", "asyncio")
    if name not in ("asyncio", "uvloop"):
        raise SystemExit(f"BENCH_LOOP={name!r}: use asyncio or uvloop")
    return name


def run_loop(main):
    """asyncio.run(main) on the loop loop_name() names."""
    factory = None
    if loop_name() == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def announce_ready(port: int) -> None:
    print(f"READY {port}", flush=True)


# ----------------------------------------------------------------------------- stats

def percentile(sorted_vals: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_vals:
        return float("nan")
    k = max(0, min(len(sorted_vals) - 1, math.ceil(q / 100.0 * len(sorted_vals)) - 1))
    return sorted_vals[k]


def latency_summary(samples_s: list[float]) -> dict:
    v = sorted(samples_s)
    us = lambda x: round(x * 1e6, 1)  # noqa: E731
    return {
        "n": len(v),
        "p50_us": us(percentile(v, 50)),
        "p99_us": us(percentile(v, 99)),
        "min_us": us(v[0]) if v else None,
        "max_us": us(v[-1]) if v else None,
        "mean_us": us(statistics.fmean(v)) if v else None,
    }


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def emit(result: dict) -> None:
    """The client's single JSON line."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def payload(n: int = BULK_CHUNK) -> bytes:
    # Not all zeros, so nothing along the way can get lucky with compression.
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


END_FRAME = bytes(4)
FRAME_HDR = 4


def bulk_result(sent: int, received: int, elapsed: float, cpu: float, **extra) -> dict:
    return {
        "test": "bulk",
        "bytes_sent": sent,
        "bytes_received_by_server": received,
        "ok": received == sent,
        "seconds": round(elapsed, 4),
        "mb_per_s": round(received / elapsed / 1e6, 2) if elapsed > 0 else None,
        "client_cpu_s": round(cpu, 3),
        **extra,
    }


def shares(total: int, n: int) -> list[int]:
    """total bytes split over n connections as evenly as possible."""
    return [total // n + (1 if i < total % n else 0) for i in range(n)]


def bulk8_result(per_conn: list[tuple[int, int, float]], elapsed: float, cpu: float, **extra) -> dict:
    """per_conn: (sent, received by the server, seconds until its count came back) per
    connection; the aggregate MB/s is all bytes over the time until the last count."""
    sent = sum(p[0] for p in per_conn)
    received = sum(p[1] for p in per_conn)
    rates = [round(p[1] / p[2] / 1e6, 2) for p in per_conn if p[2] > 0]
    r = bulk_result(sent, received, elapsed, cpu, **extra)
    r.update({
        "test": "bulk8",
        "ok": all(p[0] == p[1] for p in per_conn),
        "connections": len(per_conn),
        "per_connection_mb_per_s": rates,
        "per_connection_bytes": [p[1] for p in per_conn],
    })
    return r


def handshake_result(samples: list[float], elapsed: float, cpu: float, errors: int, **extra) -> dict:
    n = len(samples)
    return {
        "test": "handshake",
        "ok": errors == 0 and n > 0,
        "errors": errors,
        "seconds": round(elapsed, 4),
        "per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "latency": latency_summary(samples),
        "client_cpu_s": round(cpu, 3),
        **extra,
    }


def rtt_result(samples: list[float], cpu: float, mismatches: int, size: int = RTT_SIZE, **extra) -> dict:
    return {
        "test": "rtt",
        "ok": mismatches == 0 and len(samples) > 0,
        "size": size,
        "mismatches": mismatches,
        "latency": latency_summary(samples),
        "client_cpu_s": round(cpu, 3),
        **extra,
    }


def capacity_result(samples: list[float], elapsed: float, cpu: float, errors: int, mismatches: int,
                    clients: int, **extra) -> dict:
    """Concurrent clients each opening a connection, echoing 32 bytes and closing, in a loop."""
    n = len(samples)
    return {
        "test": "capacity",
        "ok": errors == 0 and mismatches == 0 and n > 0,
        "clients": clients,
        "errors": errors,
        "mismatches": mismatches,
        "handshakes": n,
        "seconds": round(elapsed, 4),
        "per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "latency": latency_summary(samples),
        "client_cpu_s": round(cpu, 3),
        **extra,
    }


def load_result(samples: list[float], elapsed: float, cpu: float, mismatches: int, clients: int,
                size: int, **extra) -> dict:
    """Concurrent clients on open connections, each sending a request and waiting for its echo."""
    n = len(samples)
    return {
        "test": "load",
        "ok": mismatches == 0 and n > 0,
        "clients": clients,
        "size": size,
        "mismatches": mismatches,
        "requests": n,
        "seconds": round(elapsed, 4),
        "per_s": round(n / elapsed, 1) if elapsed > 0 else None,
        "latency": latency_summary(samples),
        "client_cpu_s": round(cpu, 3),
        **extra,
    }


def rtt_messages(count: int, size: int = RTT_SIZE) -> list[bytes]:
    """Distinct messages of `size` bytes, so a stale or misordered echo is caught."""
    return [(i.to_bytes(8, "big") * (size // 8)) for i in range(count)]


# ----------------------------------------------------------------------------- certs

def make_credentials(dirpath: str, name: str = "bench.stcp.test") -> "Credentials":
    """Everything the peers authenticate with, made fresh for one run in dirpath:

    - TLS / QUIC: a throwaway CA (ECDSA P-256, self-signed) and, signed by it, a server
      certificate for `name`, localhost, 127.0.0.1 and ::1, and a client certificate (for
      the mutual-TLS peer). Clients trust the CA alone, so every TLS handshake verifies a
      real chain (the leaf's signature by the CA, the name, the validity, the key usage)
      as a deployment would, and check the name `SERVER_NAME`.
    - STCP: a server key and a client key (`stcp keygen` files), the server's public key
      (clients pin it) and an allow list holding the client's (the client-auth peer).
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def write(path: str, data: bytes) -> str:
        with open(os.path.join(dirpath, path), "wb") as f:
            f.write(data)
        return os.path.join(dirpath, path)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "STCP bench throwaway CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage, sans):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
             .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()), key

    sans: list[x509.GeneralName] = [x509.DNSName(name), x509.DNSName("localhost"),
                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.IPAddress(ipaddress.ip_address("::1"))]
    server_cert, server_key = leaf(name, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_cert, client_key = leaf("bench client", ExtendedKeyUsageOID.CLIENT_AUTH, None)
    pem = serialization.Encoding.PEM

    from stcp.identity import encode_key, generate_private_key, public_key, save_private_key
    stcp_server, stcp_client = generate_private_key(), generate_private_key()
    save_private_key(os.path.join(dirpath, "stcp-server.key"), stcp_server)
    save_private_key(os.path.join(dirpath, "stcp-client.key"), stcp_client)
    write("stcp-server.pub", (encode_key(public_key(stcp_server)) + "\n").encode())
    write("stcp-clients", (encode_key(public_key(stcp_client)) + " bench client\n").encode())
    return Credentials(
        ca=write("ca.pem", ca.public_bytes(pem)),
        cert=write("server.pem", server_cert.public_bytes(pem)),
        key=write("server-key.pem", pem_key(server_key)),
        client_cert=write("client.pem", client_cert.public_bytes(pem)),
        client_key=write("client-key.pem", pem_key(client_key)),
        stcp_keys=dirpath,
    )


class Credentials(NamedTuple):
    ca: str                 # the CA certificate clients trust (and the mutual-TLS server)
    cert: str               # the server's certificate, signed by the CA
    key: str
    client_cert: str        # the mutual-TLS client's certificate, signed by the CA
    client_key: str
    stcp_keys: str          # the directory of stcp-server.key, .pub, stcp-client.key, stcp-clients


def stcp_keys(args) -> dict:
    """The STCP keys of a run (--stcp-keys DIR, made by make_credentials): the server's
    private key file, its public key (base64, what clients pin), the client's key file and
    the allow list file holding the client's public key."""
    d = getattr(args, "stcp_keys", None)
    if not d:
        raise SystemExit("the STCP peers need --stcp-keys DIR (bench.run makes one: bench.common.make_credentials)")
    with open(os.path.join(d, "stcp-server.pub")) as f:
        pub = f.read().strip()
    return {"server_key": os.path.join(d, "stcp-server.key"), "server_public": pub,
            "client_key": os.path.join(d, "stcp-client.key"), "allowed_clients": os.path.join(d, "stcp-clients")}


SERVER_NAME = "bench.stcp.test"


def run_main(server: Callable[[argparse.Namespace], None], client: Callable[[argparse.Namespace], None],
             description: str, argv: list[str] | None = None) -> None:
    args = parser(description).parse_args(argv)
    # BENCH_PROFILE=DIR: run under cProfile and leave DIR/<module>.<role>[.<test>].prof and a
    # .txt of the top functions (bench.run --profile sets it).
    prof_dir = os.environ.get("BENCH_PROFILE")
    prof = None
    if prof_dir:
        import cProfile
        import signal
        prof = cProfile.Profile()
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        prof.enable()
    try:
        if args.role == "server":
            server(args)
        else:
            client(args)
    except KeyboardInterrupt:
        pass
    finally:
        if prof is not None:
            prof.disable()
            _dump_profile(prof, prof_dir, args)
        sys.stdout.flush()


def _dump_profile(prof, prof_dir: str, args) -> None:
    import io
    import pstats
    # BENCH_PROFILE_NAME: a process that is not the peer module itself (a worker of one)
    mod = os.environ.get("BENCH_PROFILE_NAME") or os.path.splitext(os.path.basename(sys.argv[0]))[0]
    name = f"{mod}.{args.role}" + (f".{args.test}" if args.role == "client" else "")
    if args.role == "client" and args.test == "rtt" and args.size != RTT_SIZE:
        name += str(args.size)                # one profile per message size
    base = os.path.join(prof_dir, name)
    prof.dump_stats(base + ".prof")
    buf = io.StringIO()
    st = pstats.Stats(prof, stream=buf)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(30)
    with open(base + ".txt", "w") as f:
        f.write(buf.getvalue())


# ----------------------------------------------------------------------------- server counters

def stats_on_sigusr1(loop, provider: Callable[[], dict], name: str = "0") -> None:
    """With BENCH_STATS=DIR (bench.run sets it for the servers in its STATS_PEERS), each
    SIGUSR1 makes this process write DIR/<name>.json: provider()'s counters, this process's
    CPU seconds and the signal's sequence number, so bench.run can take the counters before
    and after each client run.  Installed before READY: SIGUSR1 would otherwise kill."""
    path = os.environ.get("BENCH_STATS")
    if not path:
        return
    import signal
    seq = 0

    def dump() -> None:
        nonlocal seq
        seq += 1
        doc = dict(provider(), seq=seq, cpu_s=cpu_seconds(), pid=os.getpid())
        tmp = os.path.join(path, f".{name}.tmp")
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, os.path.join(path, f"{name}.json"))

    loop.add_signal_handler(signal.SIGUSR1, dump)


# ----------------------------------------------------------------------------- flood benches
REPO = Path(__file__).resolve().parent.parent


def xdp_unavailable() -> Optional[str]:
    """Why the XDP program cannot be built here (check_toolchain's one line), or None."""
    sys.path.insert(0, str(REPO))
    from stcp.datapath.errors import XdpSetupError
    from stcp.datapath.xdp_prog import check_toolchain
    try:
        check_toolchain()
    except XdpSetupError as e:
        return str(e)
    return None


def build_c(source: str, exe: Path, who: str) -> Path:
    """Compile bench/<source> (and the headers beside it) into exe with the system's cc."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit(f"{who}: needs a C compiler (cc) for bench/{source}")
    subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(REPO / "bench" / source)], check=True)
    return exe


def run_facts() -> dict:
    """Where and when a report was made: kernel, CPUs, Python, date, load, commit."""
    try:
        loadavg = Path("/proc/loadavg").read_text().strip()
    except OSError:
        loadavg = ""
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "loadavg": loadavg,
            "git_commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip()}


def write_report(out: Path, stem: str, doc: dict, markdown: Callable[[dict], str], who: str) -> None:
    """out/<stem>.json and out/<STEM>.md, said on stderr; the markdown also on stdout."""
    md = out / f"{stem.upper()}.md"
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(markdown(doc))
    print(f"{who}: wrote {md} and {out / f'{stem}.json'}", file=sys.stderr, flush=True)
    print(markdown(doc))
