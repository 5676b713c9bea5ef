"""Benchmarks: side-by-side measurements that back every published figure."""
