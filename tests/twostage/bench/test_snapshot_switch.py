"""bench recall's snapshot switch on the small test index: a recall server switches to a newer snapshot while
a client searches back to back, and no search fails."""

import pytest

from twostage.bench.recall import snapshot_switch

pytestmark = pytest.mark.slow


async def test_a_snapshot_switch_under_searches_fails_none(built_index, demo_data):
    report = await snapshot_switch(built_index, list(demo_data["queries"].values()), 10)
    assert report["failed_searches"] == 0 and report["searches"] >= 20
    assert report["documents"] > 100 and report["switch_after_publish_s"] > 0
