"""
Where a call goes: the model it names, the deployment and replica that
serve it, and the health of the replicas.
"""
