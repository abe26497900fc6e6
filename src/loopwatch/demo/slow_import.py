"""A module as slow to import as pandas or torch."""

import time

time.sleep(0.2)
FORMATS = ("csv", "json")
