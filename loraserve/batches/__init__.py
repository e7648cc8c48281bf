"""The Batch API's work, apart from HTTP: the batch state machine, its persistence and
restart recovery, and the runner thread that answers lines behind interactive traffic.

Why here, in the engine room: a batch is offline inference on this engine (its lines
run at the scheduler's BATCH_PRIORITY), not an adapter, and not HTTP. It imports the
file store from adapters/ (downward, as imports flow) and never api/: the code that
answers a line as the chat/completions routes would (api/batch_requests.py) is handed
to BatchManager at construction, and api/errors.py maps the errors here to HTTP.
"""

from .batch import (WINDOWS, Batch, BatchesStopped, BatchNotCancellable, BatchNotFound, EngineStopped,
                    Owner)
from .lines import ENDPOINTS
from .manager import BatchManager, LineAnswerer

__all__ = ["ENDPOINTS", "WINDOWS", "Batch", "BatchManager", "BatchNotCancellable", "BatchNotFound",
           "BatchesStopped", "EngineStopped", "LineAnswerer", "Owner"]
