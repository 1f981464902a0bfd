"""The SVD rows of the table in docs/benchmarks.md at 5.72 MB (bundled collection), from dense
singular values (numpy), independent of lorazip's allocator: per-adapter SVD with greedy ranks as
bare factors and as PEFT folders, and rank 1 everywhere."""
import sys, numpy as np, lorazip
sys.path.insert(0, "benchmarks")
from frontier import dense_spectra, svd_frontier, peft_overhead
coll = lorazip.load_collection("examples/fortunes/adapters")
pairs = dense_spectra(coll); n = len(coll)
B = 5_720_000
print("bare factors at 5.72MB:", svd_frontier(pairs, n, B // 2))
print("PEFT folders at 5.72MB:", svd_frontier(pairs, n, (B - peft_overhead(coll)) // 2), "overhead", peft_overhead(coll))
E = np.zeros(n); kept = np.zeros(n); num = 0
for i, c, s2 in pairs:
    E[i] += s2.sum(); kept[i] += s2[0]; num += c
print("rank 1 everywhere:", float(np.mean(1 - kept / E)), "bytes", 2 * num)
