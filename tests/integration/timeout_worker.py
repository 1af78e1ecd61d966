"""``accelerate launch ... timeout_worker.py CONFIG SECONDS``: rank 1 hangs, rank 0 waits for it in a
barrier of the process group that :func:`tvlars_scale.accelerate_setup.make_accelerator` created
with ``run.collective_timeout_s=SECONDS``. Rank 0 must raise after about that long; the launcher then
ends rank 1 and the job."""

import sys
import time

from tvlars_scale.accelerate_setup import make_accelerator
from tvlars_scale.config import load_config

config = load_config(sys.argv[1], [f"run.collective_timeout_s={sys.argv[2]}", "run.trackers=[]"])
accelerator = make_accelerator(config)
if accelerator.process_index == 1:
    time.sleep(3600)  # a hung rank: a stuck data read, a deadlock, a GPU that stopped answering
start = time.monotonic()
try:
    accelerator.wait_for_everyone()  # collective: barrier that rank 1 never reaches
except Exception as error:
    print(f"rank 0: barrier failed after {time.monotonic() - start:.1f} s: {type(error).__name__}")
    raise
