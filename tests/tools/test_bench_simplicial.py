"""tools.bench_simplicial's packed-documents cost: unpacked and packed timed alternately, ratio per round."""
from tools import bench_simplicial


def test_packed_cost_times_alternately_and_takes_the_median_ratio_of_rounds(monkeypatch):
    """The clock drifts 2x between rounds; the rounds' packed/unpacked ratios are 1.05, 1.10, 1.025 and their
    median comes back (the ratio of the separate medians, 22 / 20, would be 1.10)."""
    calls = []
    times = iter([10, 10.5, 20, 22, 40, 41,        # forward: (unpacked, packed) per round, clock slowing down
                  100, 105, 200, 220, 400, 410])   # forward + backward
    monkeypatch.setattr(bench_simplicial, "bench", lambda fn, *a, reps: calls.append(fn) or next(times))
    tp, tpb, r, rb = bench_simplicial.packed_cost(("u_fwd", "u_fb"), ("p_fwd", "p_fb"), ())
    assert calls == ["u_fwd", "p_fwd"] * 3 + ["u_fb", "p_fb"] * 3
    assert abs(r - 1.05) < 1e-12 and abs(rb - 1.05) < 1e-12
    assert (tp, tpb) == (22, 220)
