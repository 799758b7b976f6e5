#!/usr/bin/env python3
"""Soak: mixed traffic against a running gateway for N minutes, then the leak report.

    benches/soak.py URL PID MINUTES

Six workers loop over a mix of what real clients do: streaming and non-streaming chats,
streams the client abandons after the first chunk, bad inputs, prompts too long for any
context, near-context prompts, and bursts of 24 requests at once (over the fast tier's
16 slots). At the end, once traffic has stopped, it reads the server's resident memory and
open file descriptors from /proc, and from /metrics the sequences still live and the KV
cells they hold (both must be 0), and prints outcomes and unexpected errors by kind.
Standard library only; every request goes to URL (loopback).
"""

import http.client
import json
import os
import random
import sys
import threading
import time
import urllib.parse
from collections import Counter

URL, PID, MINUTES = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
HOST = urllib.parse.urlparse(URL)
LOCK = threading.Lock()
OUTCOMES = Counter()  # (kind, status)
ERRORS = Counter()  # (kind, what)
STOP_AT = time.time() + MINUTES * 60


def record(kind, status, error=None):
    with LOCK:
        OUTCOMES[(kind, status)] += 1
        if error:
            ERRORS[(kind, error)] += 1


def connection():
    return http.client.HTTPConnection(HOST.hostname, HOST.port, timeout=120)


def chat(body, headers=None):
    conn = connection()
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request("POST", "/v1/chat/completions", payload,
                 {"content-type": "application/json", **(headers or {})})
    return conn, conn.getresponse()


def messages(text):
    return [{"role": "user", "content": text}]


def streaming(model, abandon=False):
    kind = "stream-abandoned" if abandon else "stream"
    body = {"model": model, "stream": True, "max_tokens": random.choice([16, 48, 96]),
            "temperature": 0.8, "messages": messages(f"Tell me about the number {random.randint(1, 10**6)}.")}
    conn, resp = chat(body)
    if resp.status != 200:
        record(kind, resp.status, None if resp.status in (429, 503) else f"status {resp.status}")
        conn.close()
        return
    if abandon:
        resp.read(64)
        conn.close()  # the client leaves mid-stream
        record(kind, 200)
        return
    raw = resp.read().decode()
    conn.close()
    events = [e for e in raw.split("\n\n") if e]
    if not events or events[-1] != "data: [DONE]":
        last = events[-1][:80] if events else "nothing"
        record(kind, 200, "stream did not end with [DONE]: " + last)
    else:
        record(kind, 200)


def non_streaming():
    body = {"model": "auto", "max_tokens": 24, "temperature": 0,
            "messages": messages(random.choice(["What is 2+2?", "Name a colour.", "Say hello."]))}
    conn, resp = chat(body)
    data = resp.read()
    conn.close()
    if resp.status == 200:
        reply = json.loads(data)
        ok = reply.get("choices") and reply.get("usage")
        record("complete", 200, None if ok else "reply without choices or usage")
    else:
        record("complete", resp.status, None if resp.status in (429, 503) else f"status {resp.status}")


BAD_INPUTS = [
    b"{",  # not JSON
    json.dumps({"messages": []}).encode(),
    json.dumps({"messages": messages("x"), "temperature": 7}).encode(),
    json.dumps({"messages": messages("x"), "model": "gpt-9"}).encode(),
    json.dumps({"messages": messages("x"), "stop": "s" * 1000}).encode(),
    json.dumps({"messages": messages("x"), "n": 3}).encode(),
    json.dumps({"messages": messages("\u0000 nul inside")}).encode(),
]


def bad_input():
    conn, resp = chat(random.choice(BAD_INPUTS))
    data = resp.read()
    conn.close()
    shaped = resp.status >= 400 and b'"error"' in data
    record("bad-input", resp.status, None if shaped and resp.status < 500 else f"status {resp.status}")


def long_prompt():
    words = random.choice([3000, 60000, 1500])
    body = {"model": "fast", "max_tokens": 4, "messages": messages("word " * words)}
    conn, resp = chat(body)
    resp.read()
    conn.close()
    expected = {3000: (400,), 60000: (400,), 1500: (200, 503)}[words]
    record(f"prompt-{words}-words", resp.status,
           None if resp.status in expected else f"status {resp.status}")


def burst():
    threads = [threading.Thread(target=streaming, args=("fast",)) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


MIX = [(streaming, ("auto",), 30), (streaming, ("full",), 10), (streaming, ("fast", True), 15),
       (non_streaming, (), 20), (bad_input, (), 12), (long_prompt, (), 10), (burst, (), 3)]


def worker(seed):
    rng = random.Random(seed)
    choices = [(f, a) for f, a, w in MIX for _ in range(w)]
    while time.time() < STOP_AT:
        f, a = rng.choice(choices)
        try:
            f(*a)
        except Exception as e:  # a connection the server dropped, a timeout: unexpected
            record(f.__name__, "exception", type(e).__name__)


def process():
    status = open(f"/proc/{PID}/status").read()
    rss = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
    return int(rss) // 1024, len(os.listdir(f"/proc/{PID}/fd"))


def metrics():
    conn = connection()
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = Counter()
    for line in text.splitlines():
        for name in ("tiergate_active_sequences{", "tiergate_kv_cache_usage_ratio{",
                     "tiergate_waiting_requests{"):
            if line.startswith(name):
                values[name.rstrip("{")] += float(line.rsplit(" ", 1)[1])
    return values


def main():
    rss_start, fds_start = process()
    started = time.time()
    workers = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    time.sleep(3)  # let the last sequences retire
    rss_end, fds_end = process()
    held = metrics()
    print(f"soak: {(time.time() - started) / 60:.1f} min, {sum(OUTCOMES.values())} requests")
    print(f"resident memory: {rss_start} MiB at start, {rss_end} MiB at the end")
    print(f"open file descriptors: {fds_start} at start, {fds_end} at the end")
    print(f"live sequences at the end: {held['tiergate_active_sequences']:.0f}, "
          f"waiting requests: {held['tiergate_waiting_requests']:.0f}, "
          f"KV cells held (share of the cache): {held['tiergate_kv_cache_usage_ratio']:.4f}")
    print("outcomes (kind, status): count")
    for (kind, status), n in sorted(OUTCOMES.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        print(f"  {kind:<22} {status!s:<10} {n}")
    print("unexpected errors by kind:" + ("" if ERRORS else " none"))
    for (kind, what), n in ERRORS.most_common():
        print(f"  {kind:<22} {what}: {n}")
    leaked = held["tiergate_active_sequences"] or held["tiergate_kv_cache_usage_ratio"]
    sys.exit(1 if ERRORS or leaked else 0)


main()
