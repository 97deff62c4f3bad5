"""`stcp serve` under an identity key read from a file, for the multi-host test and bench:
servers behind one balancer must share a key (docs/DEPLOY.md section 2), and this branch's
`stcp serve` has no --key yet (issue 11 adds it; then this module goes and the callers say
`stcp serve --key FILE`).

    python -m tests.support.keyed_serve KEYFILE serve --listen ... [stcp serve options]
    python -m tests.support.keyed_serve --new KEYFILE      # make a key file (mode 0600)

It runs the real command line (stcp.cli.main) with Config.static_key set to the file's
key; with --workers N the supervisor hands that key to every worker as it does its own.
First it prints `stcp: server key BASE64` on stderr.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, List

from stcp.cli import main as cli, serve as serve_cmd
from stcp.config import Config
from stcp.identity import encode_key, generate_private_key, load_private_key, public_key, save_private_key


def main(argv: List[str]) -> int:
    if argv[0] == "--new":
        save_private_key(argv[1], generate_private_key())
        return 0
    key = load_private_key(argv[0])
    plain = serve_cmd.config_from_args

    def keyed(args: Any) -> Config:
        return dataclasses.replace(plain(args), static_key=key)

    serve_cmd.config_from_args = keyed   # type: ignore[assignment]
    print(f"stcp: server key {encode_key(public_key(key))}", file=sys.stderr, flush=True)
    return cli.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
