"""
The client to vLLM: a lean pooled HTTP/1.1 client for the data plane, and
treq for the proxy's own outbound calls (health probes, webhooks).
"""
