"""
The Grafana dashboard (C{deploy/grafana/dheera.json}) only queries metrics
the proxy really exports.
"""

import json
import os
import re

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import config_from_dict
from dheera_tx.observe.metrics import ProxyMetrics
from dheera_tx.routing.router import Router

DASHBOARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "deploy", "grafana", "dheera.json")


class DashboardTests(SynchronousTestCase):
    """
    The dashboard's queries against the metrics' exposition.
    """

    def test_queries_name_exported_metrics(self):
        """
        Every C{dheera_*} series a panel queries is a sample name of the
        proxy's C{/metrics} (counters as C{_total}, histograms as
        C{_bucket}), and every panel has a query and a Prometheus source.
        """
        config = config_from_dict(
            {"model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/m", "api_base": "http://127.0.0.1:9"}}]},
            environ={},
        )
        metrics = ProxyMetrics(Router(config, now=lambda: 0.0), config)

        class Sink:
            name, dropped = "webhook", 0

        metrics.add_sinks([Sink()])
        metrics.read_queue(lambda: {("m", 0): 0})
        body, _ = metrics.render()
        exported = set()
        for family in text_string_to_metric_families(body.decode()):
            exported.add(family.name)
            for suffix in ("_total", "_bucket", "_count", "_sum"):
                exported.add(family.name + suffix)
        with open(DASHBOARD) as f:
            dashboard = json.load(f)
        self.assertGreaterEqual(len(dashboard["panels"]), 20)
        queried = set()
        for panel in dashboard["panels"]:
            self.assertTrue(panel["targets"], panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"]["type"], "prometheus")
                queried.update(re.findall(r"\bdheera_[a-z_]+", target["expr"]))
        self.assertEqual(queried - exported, set())
