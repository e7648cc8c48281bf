"""What pinning an adapter's device slot can answer: the contract between the scheduler
(which decides with it and imports no torch) and the slot pool (which keeps the books)."""

import enum


class Pin(str, enum.Enum):
    PINNED = "pinned"      # resident (or its write is queued for this step), and held for the request
    LOADING = "loading"    # its weights are still being read into CPU memory: ask again later
    NO_SLOT = "no_slot"    # every slot is pinned by running requests
