"""
The C{dheera} twistd plugin: C{twistd -n dheera --config conf/proxy.yaml}.

The implementation is imported lazily from L{dheera_tx.tap}, so an import
error there is reported instead of showing up as "Unknown command".
"""

from twisted.application.service import ServiceMaker

dheera = ServiceMaker(
    "dheera",
    "dheera_tx.tap",
    "dheera_tx: a gateway for self-hosted vLLM (keys, routing, streaming, spend).",
    "dheera",
)
