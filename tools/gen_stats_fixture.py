#!/usr/bin/env python3
"""Independent reference for src/eval/stats.rs (paired bootstrap, win rates): written from the method's
definition in plain Python, not from the Rust code, and run by hand (not in CI):

    python3 tools/gen_stats_fixture.py > tests/fixtures/eval/stats.json

The method: units (prompt, seed) are shared by all negatives; RESAMPLES = 2000 resamples of the unit indices,
drawn with replacement by SplitMix64 (Steele et al. 2014) seeded with 0x5EED_B007, index = next % units; for each
resample the mean of every negative and its difference to negative 0's mean over the same resample. A 95%
interval is the pair of order statistics at ranks round(0.025 (R - 1)) and round(0.975 (R - 1)) of the sorted
resampled values (no widening: an interval may miss its point estimate, and is then reported as it is). The win
rate of negative j against negative 0 is the share of units where j scores higher, ties counting half.

Cases: a hand-checkable one (3 units; its means and win rates are also written out by hand below), a skewed
one whose mean falls outside its own percentile interval, and a larger random one.
"""
import json
import random

MASK = (1 << 64) - 1
SEED = 0x5EED_B007
RESAMPLES = 2000


class SplitMix64:
    def __init__(self, seed):
        self.s = seed & MASK

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
        return z ^ (z >> 31)


def mean(xs):
    return sum(xs) / len(xs)


def interval(values):
    v = sorted(values)
    n = len(v)

    def at(q):
        x = q * (n - 1)
        i = int(x + 0.5)  # half away from zero, as Rust's f64::round (no halves occur at n = 2000)
        return v[min(i, n - 1)]

    return [at(0.025), at(0.975)]


def win_rate(a, b):
    return mean([1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)])


def summarize(scores):
    units = len(scores[0])
    rng = SplitMix64(SEED)
    boot = [[] for _ in scores]
    boot_delta = [[] for _ in scores]
    for _ in range(RESAMPLES):
        pick = [rng.next() % units for _ in range(units)]
        base = mean([scores[0][i] for i in pick])
        for j, s in enumerate(scores):
            m = mean([s[i] for i in pick])
            boot[j].append(m)
            boot_delta[j].append(m - base)
    means = [mean(s) for s in scores]
    out = []
    for j, s in enumerate(scores):
        out.append({
            "n": units, "mean": means[j], "ci95": interval(boot[j]),
            "delta_vs_first": means[j] - means[0], "delta_ci95": interval(boot_delta[j]),
            "win_rate_vs_first": win_rate(s, scores[0]) if j > 0 else None,
        })
    return out


def main():
    rnd = random.Random(7)
    cases = {
        # By hand: means 2, 3, 2; win rates of 1 vs 0: (1 + 1 + 1) / 3 = 1; of 2 vs 0: (0 + 0.5 + 1) / 3 = 0.5.
        "hand": [[1.0, 2.0, 3.0], [2.0, 3.0, 4.0], [0.0, 2.0, 4.0]],
        # One large value among zeros: a skewed bootstrap distribution.
        "skewed": [[0.0] * 9 + [10.0], [0.0] * 10],
        "random": [[rnd.gauss(0, 1) for _ in range(25)], [rnd.gauss(0.3, 1) for _ in range(25)],
                   [rnd.gauss(-0.2, 2) for _ in range(25)]],
    }
    hand = summarize(cases["hand"])
    assert [s["mean"] for s in hand] == [2.0, 3.0, 2.0]
    assert [s["win_rate_vs_first"] for s in hand] == [None, 1.0, 0.5]
    out = {name: {"scores": scores, "summaries": summarize(scores)} for name, scores in cases.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
