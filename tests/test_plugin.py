"""
Tests for the C{dheera} twistd plugin: discovery, start-up, config errors,
and shutdown.
"""

import os
import subprocess

import treq
from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from dheera_tx.workers import twistd_command
from tests.proxy_process import ROOT, ProxyProcess


class PluginDiscoveryTests(SynchronousTestCase):
    """
    twistd finds the plugin.
    """

    def test_discoverable(self):
        """
        The C{dheera} service maker is among twistd's plugins and points at
        L{dheera_tx.tap}.
        """
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("dheera", makers)
        self.assertEqual(makers["dheera"].module, "dheera_tx.tap")

    def test_bad_config_one_line(self):
        """
        A bad config stops start-up with exit status 1 and one line naming
        the file and the field, never a traceback.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("model_list:\n  - model_name: m\n    dheera_ai_params: {model: hosted_vllm/x}\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        result = subprocess.run(
            twistd_command(path),
            env=env,
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 1)
        err = result.stderr.decode().strip()
        self.assertNotIn("Traceback", err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertIn(path, err)
        self.assertIn("dheera_ai_params.api_base", err)


class PluginRunTests(TestCase):
    """
    C{twistd -n dheera --config ...} starts with the embedded Redis and
    answers.
    """

    timeout = 60

    async def test_starts_answers_and_stops(self):
        """
        With no database configured the plugin starts its embedded Redis,
        answers liveliness and readiness (Redis connected), and exits on
        SIGTERM (twistd reports the signal as its exit status) after
        stopping the embedded Redis.  It runs on L{GatewayReactor}.
        """
        proxy = ProxyProcess(
            reactor,
            {
                "model_list": [{"model_name": "m", "dheera_ai_params": {"model": "hosted_vllm/x", "api_base": "http://127.0.0.1:9"}}],
                "general_settings": {"master_key": "sk-test-master"},
            },
        )
        self.addCleanup(proxy.cleanup)
        await proxy.start()
        response = await treq.get(proxy.url + "/health/liveliness", persistent=False)
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["status"], "alive")
        # The plugin runs on its own epoll reactor unless told otherwise.
        self.assertIn("reactor class: dheera_tx.event_loop.GatewayReactor", proxy.log_text())
        response = await treq.get(proxy.url + "/health/readiness", persistent=False)
        self.assertEqual((await response.json())["redis"], "connected")
        socket_path = os.path.join(proxy.directory, "dheera_data", "redis.sock")
        self.assertTrue(os.path.exists(socket_path))
        proxy.process.send_signal(15)
        code = await proxy.wait_exit(20)
        self.assertIn(code, (0, -15), proxy.log_tail())
        self.assertFalse(os.path.exists(socket_path))
