"""
The console in a real browser: headless Chromium (Debian's C{chromium} and
C{chromium-driver}) driven by Selenium against the proxy on loopback, a
real Redis and the fake vLLM.

The browser's steps run in a thread (Selenium blocks) while the reactor
serves the proxy.  Screenshots of each page go to C{DHEERA_SCREENSHOTS}
(default: C{screenshots/} in trial's temporary directory).
Skipped when Selenium, C{chromium} or C{chromedriver} is missing.
"""

import json
import os
import shutil
import tempfile
import time
import urllib.error
import urllib.request

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from tests.passthrough_harness import MASTER_KEY
from tests.test_console import ConsoleHarness
from tests.test_gateway_keys import ALLOWED

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser(profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1400,900", f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


class ConsoleBrowserTests(ConsoleHarness, TestCase):
    """
    An operator's round trip through the console.
    """

    timeout = 180

    async def setUp(self):
        try:
            import selenium  # noqa: F401
        except ImportError:
            raise SkipTest("selenium is not installed") from None
        if not (CHROMIUM and CHROMEDRIVER):
            raise SkipTest("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
        await super().setUp()
        self.shots = os.environ.get("DHEERA_SCREENSHOTS") or os.path.abspath("screenshots")
        os.makedirs(self.shots, exist_ok=True)

    async def test_operator_round_trip(self):
        """
        Sign in, create a key and see it once, use it through /vllm and
        watch the call appear live on the calls page and its spend on the
        key's bar, block it and see its next call refused, sign out and
        see the session gone.
        """
        await deferToThread(self.round_trip)

    def call(self, key: str) -> int:
        body = json.dumps({"model": ALLOWED, "messages": [{"role": "user", "content": "hello there"}]}).encode()
        request = urllib.request.Request(self.base + "/vllm/v1/chat/completions", data=body, method="POST")
        request.add_header("Authorization", f"Bearer {key}")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status
        except urllib.error.HTTPError as error:
            return error.code

    def round_trip(self) -> None:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ready
        from selenium.webdriver.support.ui import WebDriverWait

        profile = tempfile.mkdtemp(prefix="dheera-chromium-")
        browser = _browser(profile)
        # An element found while a page is being replaced goes stale: look
        # again, as for one not found yet.
        wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
        try:
            browser.get(self.base + "/ui")
            wait.until(ready.presence_of_element_located((By.NAME, "key")))
            browser.save_screenshot(os.path.join(self.shots, "1-sign-in.png"))
            browser.find_element(By.NAME, "key").send_keys(MASTER_KEY)
            browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
            wait.until(ready.presence_of_element_located((By.ID, "create-key")))
            self.assertTrue(browser.current_url.endswith("/ui/keys"))

            form = browser.find_element(By.ID, "create-key")
            form.find_element(By.NAME, "key_alias").send_keys("browser")
            form.find_element(By.NAME, "team_id").send_keys("red")
            form.find_element(By.NAME, "models").send_keys(ALLOWED)
            form.find_element(By.NAME, "max_budget").send_keys("0.001")
            form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            key = wait.until(ready.presence_of_element_located((By.ID, "new-key"))).text
            self.assertTrue(key.startswith("sk-"))
            browser.save_screenshot(os.path.join(self.shots, "2-key-created.png"))
            # Shown once: the keys page itself does not hold it.
            browser.get(self.base + "/ui/keys")
            self.assertNotIn(key, browser.page_source)
            self.assertNotIn(MASTER_KEY, browser.page_source)
            self.assertEqual(browser.execute_script("return document.cookie"), "")  # HttpOnly
            self.assertEqual(browser.execute_script("return window.localStorage.length + window.sessionStorage.length"), 0)

            browser.get(self.base + "/ui/calls")
            wait.until(ready.presence_of_element_located((By.ID, "calls")))
            self.assertEqual(self.call(key), 200)
            wait.until(lambda b: "browser" in b.find_element(By.ID, "calls").text)
            browser.save_screenshot(os.path.join(self.shots, "3-live-calls.png"))

            browser.get(self.base + "/ui/keys")
            row = wait.until(ready.presence_of_element_located((By.XPATH, "//tr[td[1]/a[text()='browser']]")))
            meter = row.find_element(By.TAG_NAME, "meter")
            self.assertGreater(float(meter.get_attribute("value")), 0)
            browser.save_screenshot(os.path.join(self.shots, "4-keys-spend.png"))

            row.find_element(By.XPATH, ".//button[text()='Block']").click()
            wait.until(ready.presence_of_element_located((By.XPATH, "//tr[td[1]/a[text()='browser']]/td[text()='blocked']")))
            deadline = time.monotonic() + 10
            while self.call(key) != 401 and time.monotonic() < deadline:
                time.sleep(0.05)
            self.assertEqual(self.call(key), 401)

            browser.get(self.base + "/ui/spend?group_by=key")
            wait.until(lambda b: b.find_element(By.ID, "spend-chart").get_attribute("data-drawn") == "true")
            self.assertTrue(browser.find_elements(By.CSS_SELECTOR, "#spend-chart canvas"))
            browser.save_screenshot(os.path.join(self.shots, "5-spend.png"))
            browser.get(self.base + "/ui/teams")
            self.assertIn("red", wait.until(ready.presence_of_element_located((By.ID, "teams"))).text)
            browser.save_screenshot(os.path.join(self.shots, "6-teams.png"))
            browser.get(self.base + "/ui/deployments")
            wait.until(ready.presence_of_element_located((By.ID, "deployments")))
            browser.save_screenshot(os.path.join(self.shots, "7-deployments.png"))

            # Edit the key on its page: a new rpm limit shows after saving.
            browser.get(self.base + "/ui/keys")
            browser.find_element(By.LINK_TEXT, "browser").click()
            edit = wait.until(ready.presence_of_element_located((By.ID, "edit-key")))
            limit = edit.find_element(By.NAME, "rpm_limit")
            limit.clear()
            limit.send_keys("42")
            edit.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            wait.until(lambda b: b.find_element(By.NAME, "rpm_limit").get_attribute("value") == "42")
            browser.save_screenshot(os.path.join(self.shots, "8-key.png"))
            # No console error from the CSP (inline code) on any page seen.
            problems = [entry for entry in browser.get_log("browser") if "Content Security Policy" in entry.get("message", "")]
            self.assertEqual(problems, [])

            browser.find_element(By.CSS_SELECTOR, "form.signout button").click()
            wait.until(ready.presence_of_element_located((By.NAME, "key")))
            browser.get(self.base + "/ui/keys")
            wait.until(ready.presence_of_element_located((By.NAME, "key")))
            self.assertTrue(browser.current_url.endswith("/ui/login"))
        finally:
            browser.quit()
            shutil.rmtree(profile, ignore_errors=True)
