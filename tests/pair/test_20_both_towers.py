"""With both towers up, the world's mail reaches every customer through both of them."""

from __future__ import annotations

from collections import Counter

from conftest import Pair


def test_mail_from_the_internet_reaches_every_customer_through_both_towers(pair: Pair) -> None:
    carried: Counter[str] = Counter()
    for index in range(len(pair.customers)):
        tokens = pair.submit(pair.rcpt(index), count=30)
        arrived = pair.wait_delivered(tokens, index)
        assert all(len(arrived[t]) == 1 for t in tokens), "a message arrived twice"
        carried.update(pair.tower_of(arrived[t][0]["by"]) for t in tokens)
    # Equal MX preferences: senders share the load. 60 messages all through one tower would
    # happen by chance with probability 2^-59.
    assert carried["a"] > 0 and carried["b"] > 0, f"carried by tower: {dict(carried)}"
    assert None not in carried, "a message arrived without a tower's Received header"
