#!/usr/bin/env python3
"""Cost of container detection on 10 MB objects (issue 15; docs/benchmarks.md).

expand() of two objects that are no archive, and of a zip holding 10 MB of random bytes: best
and median of 30 runs, CPU time of this thread (the machine's load does not count) and wall time.
Run with the tree to measure first on PYTHONPATH.
"""

import io
import random
import statistics
import time
import zipfile

from mailtower.scanning.containers import expand
from mailtower.scanning.objects import ScanObject

MB10 = 10 * 1024 * 1024
rng = random.Random(15)
line = b"Dear customer, please find the report attached. Kind regards, Peter\r\n"
buf = io.BytesIO()
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("photo.jpg", rng.randbytes(MB10))
objects = {
    "random 10 MB (no archive)": rng.randbytes(MB10),
    "text 10 MB (no archive)": (line * (MB10 // len(line) + 1))[:MB10],
    "zip of 10 MB random": buf.getvalue(),
}
for name, data in objects.items():
    obj = ScanObject(data=data, path="2", filenames=frozenset({"x.bin"}))
    cpu, wall = [], []
    for _ in range(30):
        cpu_started, started = time.thread_time(), time.perf_counter()
        expand(obj)
        cpu.append(time.thread_time() - cpu_started)
        wall.append(time.perf_counter() - started)
    print(
        f"{name}: CPU best {min(cpu) * 1e3:.2f} ms, median {statistics.median(cpu) * 1e3:.2f} ms;"
        f" wall best {min(wall) * 1e3:.2f} ms"
    )
