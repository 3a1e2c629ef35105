"""
What the proxy tells its operators: the per-call log and its sinks, and
Prometheus metrics.
"""
