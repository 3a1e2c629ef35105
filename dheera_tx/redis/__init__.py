"""
Redis: where it is, the bounded-time client and pub/sub over txredisapi, and
the embedded Redis used when none is configured.
"""
