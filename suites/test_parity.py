"""Area parity (a fleet run: two or more ``--host``): every host gives the same greedy answer and captures.

The same greedy requests (two prompts of different lengths, the head, the first
and last block and a block input, at generated and, where every host declares
it, prompt positions) are replayed on every host; each host's deviation is the
lower median of its distances to the others, in the values area's measure, and must be
within the sum of two hosts' dtype tolerances, with the same token ids.
``harness/protocol/parity.py`` has the method; the fleet page has the table.
"""

from __future__ import annotations

import pytest

# Every profile: a fleet run is about parity, and the replay is a handful of requests per host.
pytestmark = [pytest.mark.area("parity"), pytest.mark.smoke]


def test_host_agrees_with_the_fleet(fleet_host, fleet_parity):
    verdict = fleet_parity.verdict(fleet_host)
    others = {url: value for url, value in fleet_parity.matrix()[fleet_host].items()}
    assert verdict.ok, (
        f"{verdict.why}; median deviation {verdict.deviation:.3g} (tolerance {verdict.tolerance:.3g}); "
        f"largest difference from each host: { {u: round(v, 6) for u, v in others.items()} }"
        + (f"; {fleet_parity.note}" if fleet_parity.note else ""))
