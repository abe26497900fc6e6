"""The demo's synchronous 'legacy' library: the kind of code async tools call by mistake."""

import hashlib
import time


def fetch_record(sku: str) -> dict:
    time.sleep(0.25)  # a blocking HTTP call to the old inventory service
    return {"sku": sku, "qty": 3}


def fingerprint(rounds: int) -> str:
    digest = b"seed"
    for _ in range(rounds):
        digest = hashlib.sha256(digest + b"x" * 64).digest()
    return digest.hex()
