"""The systems the benchmarks compare against, written to cost what the originals cost (not to be fast)."""
