"""Side-by-side benchmarks: every system measured in one run, reported as ratios."""
