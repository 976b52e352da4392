"""End-to-end throughput of a tower: clean mail from the controller to the customer's Maildir."""

from __future__ import annotations

import statistics
import threading
import time

from towerlib import record_figure, wait_for

MESSAGES = 2000
CONNECTIONS = 8


def test_throughput(mail):
    tokens = [mail.token() for _ in range(MESSAGES)]
    latencies: list[float] = []
    lock = threading.Lock()
    started = time.monotonic()

    def sender(chunk: list[str]) -> None:
        smtp = mail.connect()
        for token in chunk:
            t = time.monotonic()
            smtp.send_message(
                mail.message(token), from_addr="sender@internet.lab", to_addrs=[mail.rcpt()]
            )
            with lock:
                latencies.append(time.monotonic() - t)
        smtp.quit()

    threads = [
        threading.Thread(target=sender, args=(tokens[i::CONNECTIONS],)) for i in range(CONNECTIONS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted_s = time.monotonic() - started
    wait_for(
        lambda: set(tokens) <= set(mail.delivered()), 600, "every message delivered", interval=1
    )
    delivered_s = time.monotonic() - started
    latencies.sort()
    figures = {
        "messages": MESSAGES,
        "connections": CONNECTIONS,
        "accepted_per_second": round(MESSAGES / accepted_s, 1),
        "delivered_per_second": round(MESSAGES / delivered_s, 1),
        "accept_latency_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "accept_latency_p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
    }
    record_figure("throughput", figures)
    print(figures)
    assert delivered_s < 600
