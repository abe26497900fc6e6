"""The workload's own helper module: a synchronous call its tool makes by mistake."""

import time


def fetch_record(key: str) -> dict:
    time.sleep(0.3)  # BLOCKER sleep
    return {"key": key}
