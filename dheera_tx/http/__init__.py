"""
The listener: one lean HTTP/1.1 protocol on httptools serving both planes,
the rules a request head and target must pass, the client side of a call
(its body in, its answer out) and the bridge to the Klein control plane.
"""
