"""A module that takes a while to import (it is dropped from sys.modules before each round)."""

import time

time.sleep(0.3)  # the import's own work
VALUE = 1
