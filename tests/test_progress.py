"""The shared progress helper: plain lines off a terminal (one per tenth, with rate and ETA)."""

from __future__ import annotations

import io

from moesim.progress import Progress, _duration


def test_plain_lines_one_per_tenth_with_rate_and_eta():
    out = io.StringIO()
    p = Progress(20, "sweep", "cfg", initial=5, stream=out, terminal=False)
    for _ in range(15):
        p.update()
    p.close()
    lines = out.getvalue().splitlines()
    # 5 were reused (25%): tenths 3..10 remain, each reported once
    assert [ln.split(" (")[0] for ln in lines] == [f"sweep: {n}/20 cfg" for n in (6, 8, 10, 12, 14, 16, 18, 20)]
    assert "cfg/s, ETA " in lines[0] and "ETA" not in lines[-1] and lines[-1].startswith("sweep: 20/20 cfg (100%)")


def test_a_terminal_gets_a_bar_and_durations_read_well():
    out = io.StringIO()
    p = Progress(3, "search", "cfg", stream=out, terminal=True)
    p.update(3)
    p.close()
    assert "3/3" in out.getvalue() and "cfg/s" in out.getvalue()
    assert [_duration(s) for s in (5, 75, 3725)] == ["5s", "1m15s", "1h02m"]
