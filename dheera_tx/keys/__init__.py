"""
Who is calling: the master key and virtual keys, their records in Redis,
the in-process cache of them, and the admin API that manages them.
"""
