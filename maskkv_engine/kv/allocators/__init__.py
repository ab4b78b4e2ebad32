"""Allocators: how many prompt tokens each (layer, KV head) keeps, whatever scorer chooses them."""
