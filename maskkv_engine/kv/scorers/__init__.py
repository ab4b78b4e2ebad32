"""Scorers: which prompt tokens a KV head keeps (one score per cacheable token; the top-k are kept)."""
