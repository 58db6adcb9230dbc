"""Run GPU test functions directly, printing each failure's traceback at once (pytest prints its report only
after fixture teardown, which a failed NCCL test can block)."""

import importlib
import os
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist

module_name, *names = sys.argv[1:]
module = importlib.import_module(module_name)
torch.cuda.set_device(0)
with tempfile.TemporaryDirectory() as tmp:
    dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    failed = 0
    for name in names:
        try:
            getattr(module, name)(dist.group.WORLD)
            print(f"PASSED {name}", flush=True)
        except BaseException:  # noqa: BLE001 (report every kind, skips included)
            failed += 1
            print(f"FAILED {name}\n{traceback.format_exc()}", flush=True)
os._exit(1 if failed else 0)
