#!/usr/bin/env python3
"""RSS of the services while the lab's GET /messages streams a log: used by bench/growth.

    rss-reads.py BASE_URL COUNT SIZE READERS LOGGING_PIDS FACADE_PID

POSTs COUNT messages of SIZE bytes through the facade at BASE_URL (16 at a time), then
runs READERS concurrent GET /messages (each read whole, its length checked) while sampling
the RSS of every process every 50 ms. Prints one line per process: its RSS before the reads
and its largest growth over that during them, in MB, then the reads' time and MB/s.
"""
import json, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor

base, count, size, readers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
logging_pids = [int(p) for p in sys.argv[5].split(",")]
facade_pid = int(sys.argv[6])

def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0

def post(i):
    text = f"{i:08d}" + "x" * (size - 8)
    body = json.dumps({"msg": text}).encode()
    request = urllib.request.Request(f"{base}/messages", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as answer:
        assert answer.status == 201, answer.status

with ThreadPoolExecutor(16) as pool:
    list(pool.map(post, range(count)))

def get(_):
    got = 0
    with urllib.request.urlopen(f"{base}/messages", timeout=600) as answer:
        assert answer.status == 200, answer.status
        while chunk := answer.read(1 << 20):
            got += len(chunk)
    # Every text with its quotes and comma, inside {"logs":[...],"message":...}.
    least = count * (size + 3)
    assert got >= least, f"a GET of {got} bytes, {least} at least expected"
    return got

pids = {f"logging {i + 1}": pid for i, pid in enumerate(logging_pids)}
pids["facade"] = facade_pid
before = {name: rss_kb(pid) for name, pid in pids.items()}
peak = dict(before)
done = threading.Event()

def sample():
    while not done.is_set():
        for name, pid in pids.items():
            peak[name] = max(peak[name], rss_kb(pid))
        time.sleep(0.05)

sampler = threading.Thread(target=sample)
sampler.start()
started = time.time()
with ThreadPoolExecutor(readers) as pool:
    sizes = list(pool.map(get, range(readers)))
took = time.time() - started
done.set()
sampler.join()
for name in pids:
    print(f"{name}: {before[name] / 1024:.0f} MB before, +{(peak[name] - before[name]) / 1024:.0f} MB at most")
print(f"reads: {readers} x {sizes[0] / 1e6:.0f} MB in {took:.1f} s, {sum(sizes) / 1e6 / took:.0f} MB/s")
