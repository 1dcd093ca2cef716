#!/usr/bin/env bash
# The disk's own limits, for docs/BENCHMARKS.md: sequential writes with an fdatasync
# after every write, at the block sizes the engine's batches produce (4 KiB for a batch
# of one 100-byte envelope; ~200 KiB for a batch of 1024). Run in the same session as
# `engine_figures`, on the same file system. Needs fio (apt-get install fio).
set -euo pipefail
dir="${1:-target/fio-baseline}"
mkdir -p "$dir"
for bs in 4k 256k; do
  fio --name="seq-fdatasync-$bs" --directory="$dir" --rw=write --bs="$bs" --size=256m \
      --ioengine=io_uring --direct=1 --fdatasync=1 --runtime=20 --time_based=0 \
      --output-format=normal | grep -E 'WRITE:|lat \(usec\)|clat percentiles|99.00th|50.00th|sync \(usec\)' || true
done
rm -rf "$dir"
