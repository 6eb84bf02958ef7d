#!/usr/bin/env python3
# Sorts `perf script` samples of a `dedup` run into the phases of
# docs/cost-model.md by the frames of each sample (see that file).
# Usage: perf script -i perf.data | scripts/perf_phases.py PERIOD_MS LINES
import sys, re, collections
# perf script output with callchains: classify each sample into a phase by its frames (leaf first).
rules = [
    ("zeroing of fresh table pages (kernel)", ["clear_page", "folio_zero_user"]),
    ("page faults, other kernel memory", ["exc_page_fault", "do_anonymous_page", "__handle_mm_fault", "unmap_page_range", "do_exit", "exit_mmap", "zap_"]),
    ("output", ["Output::", "output::", "sys_write", "ksys_write", "Job::plain_chunk"]),
    ("read", ["ksys_read", "vfs_read", "filemap_read", "_copy_to_iter", "ext4_file_read", "__memset"]),
    ("split", ["RecordReader::cut", "memchr::"]),
    ("hash", ["Parsed::parse", "xxh3"]),
    ("probe", ["engine::", "exact::", "judge::", "Judge::", "Deduper::", "Shard::", "held_verdict"]),
    ("output", ["Job::chunk"]),
    # xxh3 inlined into the reader thread's loop over a chunk's records
    # (frames above it are lost without frame pointers).
    ("hash", ["Map<I,F> as core::iter::traits::iterator::Iterator>::fold"]),
]
count = collections.Counter(); tot = 0
sample = []
def flush():
    global tot
    if not sample: return
    tot += 1
    for name, keys in rules:
        if any(k in f for f in sample for k in keys):
            count[name] += 1; return
    count["other: " + (sample[0][:60] if sample else "?")] += 1
for line in sys.stdin:
    if not line.strip():
        flush(); sample = []; continue
    if line[0] not in " \t":
        continue
    parts = line.strip().split(None, 1)
    if len(parts) == 2: sample.append(parts[1])
flush()
period_ms = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
lines = float(sys.argv[2]) if len(sys.argv) > 2 else 5e6
for name, c in count.most_common(25):
    print(f"{name:45s} {c:6d} samples {c*period_ms:8.1f} ms CPU {c*period_ms*1e6/lines:6.1f} ns/line")
print("total", tot, tot*period_ms, "ms CPU")
