"""
The operator console at C{/ui}: server-rendered pages over the same
services as the JSON APIs, with server-side sessions.
"""
