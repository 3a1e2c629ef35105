"""
Tests for L{dheera_tx.config}.
"""

import os

import attr
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

from dheera_tx.config import (
    ConfigError,
    Deployment,
    GeneralSettings,
    ProxyConfig,
    RouterSettings,
    config_from_dict,
    load_config,
)

SHIPPED = FilePath(__file__).parent().sibling("conf").child("proxy.yaml")


def entry(name="m", **params):
    """
    :return: a C{model_list} entry for C{name}; C{params} override the
        defaults, and a value of L{None} removes that parameter.
    """
    merged = {"model": "hosted_vllm/served", "api_base": "http://127.0.0.1:8000"}
    merged.update(params)
    return {"model_name": name, "dheera_ai_params": {k: v for k, v in merged.items() if v is not None}}


class ConfigTestMixin:
    """
    Helpers to load configs and to check the shape of their errors.
    """

    def write(self, text):
        """
        :return: the path of a temp file holding C{text}.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def failure(self, data, environ=None, path="<memory>"):
        """
        :return: the message of the L{ConfigError} that C{data} raises,
            after checking that it is one line starting with the file name.
        """
        with self.assertRaises(ConfigError) as caught:
            config_from_dict(data, path=path, environ=environ or {})
        return self.oneLine(caught.exception, path)

    def fileFailure(self, path, environ=None):
        """
        :return: the message of the L{ConfigError} that loading C{path}
            raises, checked to be one line naming the file.
        """
        with self.assertRaises(ConfigError) as caught:
            load_config(path, environ=environ or {})
        return self.oneLine(caught.exception, path)

    def oneLine(self, error, path):
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertNotIn("\r", message)
        self.assertTrue(message.startswith(f"config error: {path}: "), message)
        return message


class LoadConfigTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for L{load_config}: files, YAML and the shipped example.
    """

    def test_shippedExample(self):
        """
        The shipped C{conf/proxy.yaml} loads with no environment variables:
        one model, its costs, the literal master key, no database (embedded
        Redis) and the json_log sink.
        """
        config = load_config(SHIPPED.path, environ={})
        self.assertEqual(config.model_names, ("my-vllm-model",))
        [deployment] = config.deployments
        self.assertEqual(deployment.served_model, "qwen2.5-7b-instruct")
        self.assertEqual(deployment.api_base, "http://127.0.0.1:8000")
        self.assertEqual(deployment.input_cost_per_token, 0.0000002)
        self.assertEqual(deployment.output_cost_per_token, 0.0000006)
        self.assertEqual(config.general.master_key, "sk-dheera-change-me")
        self.assertIsNone(config.general.database_url)
        self.assertEqual(config.callbacks, ("json_log",))
        self.assertEqual(config.default_deployment, deployment)
        self.assertEqual(config.path, SHIPPED.path)

    def test_emptyFile(self):
        """
        An empty file, or one holding only comments, is an empty config.
        """
        for text in ("", "# nothing here\n\n# at all\n"):
            config = load_config(self.write(text), environ={})
            self.assertEqual(config.deployments, ())
            self.assertIsNone(config.default_deployment)
            self.assertEqual(config.general, GeneralSettings())
            self.assertEqual(config.router, RouterSettings())
            self.assertEqual(config.callbacks, ())

    def test_badYAML(self):
        """
        Broken YAML is one line with the line and column of the problem.
        """
        path = self.write("general_settings:\n  master_key: sk-1\n   data_dir: x\n")
        message = self.fileFailure(path)
        self.assertEqual(
            message, f"config error: {path}: invalid YAML at line 3, column 12: mapping values are not allowed here"
        )
        path = self.write("model_list:\n  - model_name: a\n    dheera_ai_params: {model: x\n  bad: [\n")
        self.assertIn(": invalid YAML at line 4, column 6: while parsing a flow mapping", self.fileFailure(path))

    def test_tabIndent(self):
        """
        A tab used for indentation is reported at its line.
        """
        message = self.fileFailure(self.write("general_settings:\n\tmaster_key: sk-x\n"))
        self.assertIn("invalid YAML at line 2, column 1", message)

    def test_duplicateKey(self):
        """
        A key written twice in one mapping is an error at the second one,
        not a silent override.
        """
        text = "model_list:\n  - model_name: a\n    dheera_ai_params:\n      model: x\n      api_base: http://a\n      api_base: http://b\n"
        message = self.fileFailure(self.write(text))
        self.assertIn("invalid YAML at line 6, column 7: key api_base appears twice", message)

    def test_missingFile(self):
        """
        A file that does not exist is one line naming it.
        """
        path = self.mktemp()
        message = self.fileFailure(path)
        self.assertEqual(message, f"config error: {path}: cannot read the file: No such file or directory")

    def test_directory(self):
        """
        A directory instead of a file is one line naming it.
        """
        path = self.mktemp()
        os.mkdir(path)
        self.assertIn("cannot read the file", self.fileFailure(path))

    def test_notUTF8(self):
        """
        A file that is not UTF-8 is one line naming the line.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"model_list:\n# caf\xe9\n")
        self.assertIn("not UTF-8 text (line 2)", self.fileFailure(path))

    def test_topLevelNotMapping(self):
        """
        A document that is a list or a string, not a mapping, is an error.
        """
        self.assertIn("top level: expected a mapping of sections", self.fileFailure(self.write("- a\n- b\n")))
        self.assertIn("top level", self.failure("model_list"))

    def test_unknownSection(self):
        """
        An unknown top-level section is an error naming it; LiteLLM's
        litellm_settings gets a hint.
        """
        message = self.failure({"model_list": [], "modle_list": []})
        self.assertIn(": modle_list: unknown top-level section", message)
        self.assertIn("did you mean dheera_ai_settings", self.failure({"litellm_settings": {}}))

    def test_sectionWrongType(self):
        """
        A section that is not a mapping (or model_list not a list) is an
        error naming the section.
        """
        self.assertIn("general_settings: expected a mapping, got a list", self.failure({"general_settings": []}))
        self.assertIn("model_list: expected a list", self.failure({"model_list": {"a": 1}}))


class ModelListTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{model_list} entries.
    """

    def test_deployment(self):
        """
        An entry becomes a L{Deployment} with its parameters, the
        hosted_vllm/ prefix stripped and the trailing slash of api_base
        removed; cost strings such as C{"2e-7"} parse as numbers.
        """
        params = {
            "model": "hosted_vllm/Qwen/Qwen2.5-7B-Instruct",
            "api_base": "https://gpu.example:8443/prefix/",
            "api_key": "token-abc",
            "input_cost_per_token": "2e-7",
            "output_cost_per_token": 0,
            "timeout": 30,
            "stream_timeout": "5.5",
            "connect_timeout": 2,
            "keepalive_timeout": 1.5,
        }
        config = config_from_dict({"model_list": [{"model_name": "q", "dheera_ai_params": params}]})
        self.assertEqual(
            config.deployments,
            (
                Deployment(
                    model_name="q",
                    served_model="Qwen/Qwen2.5-7B-Instruct",
                    api_base="https://gpu.example:8443/prefix",
                    api_key="token-abc",
                    input_cost_per_token=2e-7,
                    output_cost_per_token=0.0,
                    timeout=30.0,
                    stream_timeout=5.5,
                    connect_timeout=2.0,
                    keepalive_timeout=1.5,
                    index=0,
                ),
            ),
        )

    def test_defaults(self):
        """
        Parameters left out take the documented defaults; a bare served
        name (no prefix, even with a slash) is kept as is.
        """
        config = config_from_dict({"model_list": [entry(model="meta-llama/Llama-3.1-8B-Instruct")]})
        [d] = config.deployments
        self.assertEqual(d.served_model, "meta-llama/Llama-3.1-8B-Instruct")
        self.assertEqual((d.api_key, d.input_cost_per_token, d.output_cost_per_token), (None, 0.0, 0.0))
        self.assertEqual((d.timeout, d.stream_timeout, d.connect_timeout), (600.0, 60.0, 10.0))
        self.assertEqual(d.keepalive_timeout, 4.0)

    def test_litellmParamsAlias(self):
        """
        C{litellm_params} is accepted as C{dheera_ai_params}, and errors in
        it are named with the word the user wrote; both at once is an error.
        """
        config = config_from_dict(
            {"model_list": [{"model_name": "m", "litellm_params": {"model": "x", "api_base": "http://h"}}]}
        )
        self.assertEqual(config.deployments[0].api_base, "http://h")
        message = self.failure({"model_list": [{"model_name": "m", "litellm_params": {"model": "x"}}]})
        self.assertIn("model_list[0] (m): litellm_params.api_base: missing", message)
        both = dict(entry(), litellm_params={"model": "x", "api_base": "http://h"})
        self.assertIn("has both dheera_ai_params and litellm_params", self.failure({"model_list": [both]}))

    def test_missingApiBase(self):
        """
        An entry without api_base is an error naming the entry and field.
        """
        message = self.failure({"model_list": [entry("a"), entry("my-model", api_base=None)]})
        self.assertIn(": model_list[1] (my-model): dheera_ai_params.api_base: missing", message)

    def test_missingModelAndName(self):
        """
        An entry without model, model_name or dheera_ai_params is an error
        naming what is missing.
        """
        self.assertIn("model_list[0] (m): dheera_ai_params.model: missing", self.failure({"model_list": [entry(model=None)]}))
        self.assertIn("model_list[0]: model_name: missing", self.failure({"model_list": [{"dheera_ai_params": {}}]}))
        self.assertIn("model_list[0] (m): dheera_ai_params: missing", self.failure({"model_list": [{"model_name": "m"}]}))
        self.assertIn("model_list[0]: model_name: expected a non-empty string", self.failure({"model_list": [dict(entry(), model_name=" ")]}))
        self.assertIn("model_list[0]: expected a mapping", self.failure({"model_list": ["m"]}))

    def test_nonNumericCost(self):
        """
        A cost that is not a number, a boolean, negative or not finite is
        an error naming the field.
        """
        for bad in ("cheap", True, -1, "nan", [1]):
            message = self.failure({"model_list": [entry(input_cost_per_token=bad)]})
            self.assertIn("model_list[0] (m): dheera_ai_params.input_cost_per_token: ", message)
        self.assertIn("expected a number", self.failure({"model_list": [entry(output_cost_per_token="cheap")]}))
        self.assertIn("must be >= 0", self.failure({"model_list": [entry(output_cost_per_token=-1e-9)]}))

    def test_timeouts(self):
        """
        Timeouts must be numbers greater than zero.
        """
        for field in ("timeout", "stream_timeout", "connect_timeout", "keepalive_timeout"):
            self.assertIn(f"{field}: must be > 0", self.failure({"model_list": [entry(**{field: 0})]}))

    def test_unknownParam(self):
        """
        An unknown parameter (here LiteLLM's rpm) is an error naming it; so
        is an unknown field on the entry itself.
        """
        message = self.failure({"model_list": [entry(rpm=10)]})
        self.assertIn("model_list[0] (m): dheera_ai_params.rpm: unknown parameter", message)
        message = self.failure({"model_list": [dict(entry(), tpm=5)]})
        self.assertIn("model_list[0]: tpm: unknown field", message)

    def test_modelInfo(self):
        """
        C{model_info} is accepted on an entry, but must be a mapping.
        """
        config = config_from_dict({"model_list": [dict(entry(), model_info={"id": "x"})]})
        self.assertEqual(len(config.deployments), 1)
        self.assertIn("model_info: expected a mapping", self.failure({"model_list": [dict(entry(), model_info=[1])]}))

    def test_otherProvider(self):
        """
        A LiteLLM provider prefix other than hosted_vllm/ is refused with a
        message saying how to write it; hosted_vllm/ followed by such a name
        is the served name.
        """
        message = self.failure({"model_list": [entry(model="openai/gpt-oss-20b")]})
        self.assertIn("dheera_ai_params.model: provider prefix openai/ is not supported", message)
        self.assertIn("hosted_vllm/openai/gpt-oss-20b", message)
        config = config_from_dict({"model_list": [entry(model="hosted_vllm/openai/gpt-oss-20b")]})
        self.assertEqual(config.deployments[0].served_model, "openai/gpt-oss-20b")
        self.assertIn("names no model", self.failure({"model_list": [entry(model="hosted_vllm/")]}))

    def test_badURLScheme(self):
        """
        An api_base that is not an http(s) URL with a host is an error.
        """
        for bad in ("ftp://h:21", "127.0.0.1:8000", "localhost:8000", "http://", "http:/h", "http://h:99999", 8000):
            message = self.failure({"model_list": [entry(api_base=bad)]})
            self.assertIn("model_list[0] (m): dheera_ai_params.api_base: ", message)

    def test_urlQueryAndUserinfo(self):
        """
        An api_base with a query, a fragment or a user:password is refused,
        and the password is not quoted.
        """
        for bad in ("http://h/?x=1", "http://h#f", "http://h?"):
            self.assertIn("query string or fragment", self.failure({"model_list": [entry(api_base=bad)]}))
        message = self.failure({"model_list": [entry(api_base="http://user:hunter2@h:8000")]})
        self.assertIn("must not hold a user or password", message)
        self.assertNotIn("hunter2", message)

    def test_urlNormalised(self):
        """
        The scheme is lower-cased, every trailing slash removed and an IPv6
        host accepted.
        """
        config = config_from_dict({"model_list": [entry("a", api_base="HTTP://[::1]:8000//"), entry("b", api_base="https://h/p/")]})
        self.assertEqual([d.api_base for d in config.deployments], ["http://[::1]:8000", "https://h/p"])

    def test_replicas(self):
        """
        Entries sharing a model_name are replicas, in file order, with their
        positions as index and id; model_names lists each name once.
        """
        config = config_from_dict(
            {"model_list": [entry("a", api_base="http://1"), entry("b"), entry("a", api_base="http://2")]}
        )
        self.assertEqual([d.api_base for d in config.replicas("a")], ["http://1", "http://2"])
        self.assertEqual([d.id for d in config.replicas("a")], ["a#0", "a#2"])
        self.assertEqual(config.replicas("nope"), ())
        self.assertEqual(config.model_names, ("a", "b"))


class EnvironmentTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{os.environ/NAME}, C{environment_variables} and the
    environment-alone settings.
    """

    def test_reference(self):
        """
        C{os.environ/NAME} strings are replaced anywhere, in lists and
        nested mappings too.
        """
        data = {
            "model_list": [entry(api_key="os.environ/KEY", api_base="os.environ/BASE")],
            "general_settings": {"tenant_routes": ["sleep", "os.environ/ROUTE"]},
            "dheera_ai_settings": {"callbacks": ["os.environ/SINK"], "webhook": {"headers": ["os.environ/KEY"]}},
        }
        environ = {"KEY": "tok", "BASE": "http://b:1", "ROUTE": "wake_up", "SINK": "webhook"}
        config = config_from_dict(data, environ=environ)
        self.assertEqual((config.deployments[0].api_key, config.deployments[0].api_base), ("tok", "http://b:1"))
        self.assertEqual(config.general.tenant_routes, ("sleep", "wake_up"))
        self.assertEqual(config.callbacks, ("webhook",))
        self.assertEqual(config.dheera_ai_settings["webhook"], {"headers": ["tok"]})
        self.assertEqual(data["dheera_ai_settings"]["callbacks"], ["os.environ/SINK"])

    def test_missingVariable(self):
        """
        A reference to an unset variable names the variable and where it
        was used.
        """
        message = self.failure({"model_list": [entry("my-model", api_key="os.environ/HOSTED_VLLM_API_KEY")]})
        self.assertIn("model_list[0] (my-model): dheera_ai_params.api_key: environment variable HOSTED_VLLM_API_KEY is not set", message)
        message = self.failure({"dheera_ai_settings": {"webhook": {"urls": ["http://x", "os.environ/HOOK"]}}})
        self.assertIn("dheera_ai_settings.webhook.urls[1]: environment variable HOOK is not set", message)

    def test_environmentVariables(self):
        """
        C{environment_variables} feed os.environ/ lookups and the env-alone
        settings, override the given environment, and leave both the given
        mapping and C{os.environ} untouched.
        """
        name = "DHEERA_TEST_CONFIG_VARIABLE"
        environ = {"BASE": "http://real"}
        data = {
            "environment_variables": {name: "http://from-file", "BASE": "http://override", "DHEERA_AI_MASTER_KEY": "sk-env"},
            "model_list": [entry("a", api_base=f"os.environ/{name}"), entry("b", api_base="os.environ/BASE")],
        }
        config = config_from_dict(data, environ=environ)
        self.assertEqual([d.api_base for d in config.deployments], ["http://from-file", "http://override"])
        self.assertEqual(config.general.master_key, "sk-env")
        self.assertEqual(environ, {"BASE": "http://real"})
        self.assertNotIn(name, os.environ)

    def test_environmentVariablesValues(self):
        """
        Numbers and booleans in C{environment_variables} become strings;
        lists and nulls are errors naming the variable.
        """
        data = {
            "environment_variables": {"N": 7, "B": True},
            "general_settings": {"max_headers": "os.environ/N", "metrics_require_auth": "os.environ/B"},
        }
        config = config_from_dict(data)
        self.assertEqual((config.general.max_headers, config.general.metrics_require_auth), (7, True))
        message = self.failure({"environment_variables": {"X": [1]}})
        self.assertIn("environment_variables.X: expected a string or a number", message)

    def test_envMasterKeyAndDatabase(self):
        """
        DHEERA_AI_MASTER_KEY and DATABASE_URL apply when the file sets no
        master_key or database_url; the file's values win otherwise.
        """
        environ = {"DHEERA_AI_MASTER_KEY": "sk-from-env", "DATABASE_URL": "redis://r:6379/0"}
        general = config_from_dict({}, environ=environ).general
        self.assertEqual((general.master_key, general.database_url), ("sk-from-env", "redis://r:6379/0"))
        data = {"general_settings": {"master_key": "sk-file", "database_url": "unix:///tmp/r.sock"}}
        general = config_from_dict(data, environ=environ).general
        self.assertEqual((general.master_key, general.database_url), ("sk-file", "unix:///tmp/r.sock"))

    def test_envMasterKeyPrefix(self):
        """
        A DHEERA_AI_MASTER_KEY without the sk- prefix is an error naming the
        variable, not its value.
        """
        message = self.failure({}, environ={"DHEERA_AI_MASTER_KEY": "hunter2-secret"})
        self.assertIn("environment variable DHEERA_AI_MASTER_KEY: must start with 'sk-'", message)
        self.assertNotIn("hunter2", message)


class DefaultDeploymentTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for L{ProxyConfig.default_deployment}.
    """

    def test_hostedVllmApiBase(self):
        """
        HOSTED_VLLM_API_BASE (checked like api_base) with HOSTED_VLLM_API_KEY
        is the default upstream, even when the file has one entry.
        """
        environ = {"HOSTED_VLLM_API_BASE": "http://gpu:8000/", "HOSTED_VLLM_API_KEY": "tok", "VLLM_API_BASE": "http://other"}
        config = config_from_dict({"model_list": [entry()]}, environ=environ)
        self.assertEqual(
            config.default_deployment,
            Deployment(model_name="", served_model=None, api_base="http://gpu:8000", api_key="tok", index=-1),
        )
        self.assertEqual(config.default_deployment.id, "default")

    def test_vllmApiBase(self):
        """
        VLLM_API_BASE is used when HOSTED_VLLM_API_BASE is not set.
        """
        config = config_from_dict({}, environ={"VLLM_API_BASE": "http://v:1"})
        self.assertEqual(config.default_deployment.api_base, "http://v:1")
        self.assertIsNone(config.default_deployment.api_key)

    def test_badEnvApiBase(self):
        """
        A HOSTED_VLLM_API_BASE that is not an http(s) URL is an error naming
        the variable.
        """
        message = self.failure({}, environ={"HOSTED_VLLM_API_BASE": "gpu:8000"})
        self.assertIn("environment variable HOSTED_VLLM_API_BASE: must be an http:// or https:// URL", message)

    def test_singleEntry(self):
        """
        With no environment default and exactly one entry, that entry is the
        default upstream.
        """
        config = config_from_dict({"model_list": [entry()]})
        self.assertIs(config.default_deployment, config.deployments[0])

    def test_twoEntries(self):
        """
        With two entries (even replicas of one name) and no environment
        default there is no default upstream.
        """
        self.assertIsNone(config_from_dict({"model_list": [entry("a"), entry("a")]}).default_deployment)
        self.assertIsNone(config_from_dict({}).default_deployment)


class SettingsTests(ConfigTestMixin, SynchronousTestCase):
    """
    Tests for C{general_settings}, C{router_settings} and
    C{dheera_ai_settings}.
    """

    def test_generalSettings(self):
        """
        Every general setting is read and typed; tenant routes lose their
        leading slash (and a /vllm/ prefix) and become a tuple.
        """
        data = {
            "general_settings": {
                "master_key": "sk-1234",
                "database_url": "redis://h:6379/1",
                "redis_key_prefix": "p:",
                "max_request_body_bytes": 10,
                "max_json_body_bytes": 8,
                "max_control_body_bytes": 6,
                "metrics_require_auth": True,
                "tenant_routes": ["/sleep", "v1/load_lora_adapter", "/vllm/adapters/*"],
                "data_dir": "/var/lib/dheera",
                "header_timeout": 1,
                "body_timeout": 2.5,
                "max_header_bytes": 1000,
                "max_headers": 10,
                "graceful_shutdown_timeout": 3,
                "background_health_checks": True,
                "health_check_interval": 15,
                "max_connections": 50,
                "default_max_tokens_reservation": 512,
                "end_user_ttl_days": 7,
                "max_new_end_users_per_day": 100,
            }
        }
        self.assertEqual(set(data["general_settings"]), {a.name for a in attr.fields(GeneralSettings)})
        general = config_from_dict(data).general
        self.assertEqual(general.tenant_routes, ("sleep", "v1/load_lora_adapter", "adapters/*"))
        self.assertEqual(
            attr.asdict(general, retain_collection_types=True),
            dict(data["general_settings"], tenant_routes=("sleep", "v1/load_lora_adapter", "adapters/*")),
        )

    def test_generalSettingsKnownKeys(self):
        """
        A setting that is not a L{GeneralSettings} field is an error naming
        it; by default no route is added to the tenant API.
        """
        self.assertEqual(GeneralSettings().tenant_routes, ())
        self.assertIn("general_settings.store_model_in_db: unknown setting", self.failure({"general_settings": {"store_model_in_db": True}}))

    def test_operatorRoutesRetired(self):
        """
        A config still naming C{operator_routes} stops start-up with one
        line telling the operator what holds now and what to write instead,
        rather than being ignored (its routes would silently change
        meaning).
        """
        message = self.failure({"general_settings": {"operator_routes": ["sleep"]}})
        self.assertIn("general_settings.operator_routes: no longer supported", message)
        self.assertIn("general_settings.tenant_routes", message)
        self.assertNotIn("\n", message)

    def test_generalSettingsTypes(self):
        """
        Wrong types or ranges in general_settings are errors naming the
        setting.
        """
        cases = [
            ("max_request_body_bytes", 1.5, "expected a whole number"),
            ("max_headers", 0, "must be >= 1"),
            ("max_header_bytes", True, "expected a whole number"),
            ("header_timeout", 0, "must be > 0"),
            ("body_timeout", "soon", "expected a number"),
            ("metrics_require_auth", "maybe", "expected true or false"),
            ("tenant_routes", "sleep", "expected a list of vLLM routes"),
            ("tenant_routes", ["/"], "expected a list of vLLM routes"),
            ("tenant_routes", ["v1//x"], "expected a list of vLLM routes"),
            ("tenant_routes", ["v1/resp*"], "expected a list of vLLM routes"),
            ("tenant_routes", ["v1/x?y=1"], "expected a list of vLLM routes"),
            ("redis_key_prefix", "", "expected a non-empty string"),
            ("database_url", 5, "expected a non-empty string"),
        ]
        for key, value, what in cases:
            self.assertIn(f"general_settings.{key}: {what}", self.failure({"general_settings": {key: value}}))

    def test_masterKeyPrefix(self):
        """
        A master_key without the sk- prefix is an error that does not quote
        the key.
        """
        message = self.failure({"general_settings": {"master_key": "my-secret-admin-key"}})
        self.assertIn("general_settings.master_key: must start with 'sk-'", message)
        self.assertNotIn("my-secret-admin-key", message)

    def test_routerSettings(self):
        """
        router_settings are read and checked; unknown ones are errors.
        """
        router = config_from_dict({"router_settings": {"allowed_fails": 1, "cooldown_time": 0}}).router
        self.assertEqual(router, RouterSettings(allowed_fails=1, cooldown_time=0.0))
        self.assertIn("router_settings.allowed_fails: must be >= 1", self.failure({"router_settings": {"allowed_fails": 0}}))
        self.assertIn("router_settings.cooldown_time: must be >= 0", self.failure({"router_settings": {"cooldown_time": -1}}))
        self.assertIn("router_settings.retry_policy: unknown setting", self.failure({"router_settings": {"retry_policy": "x"}}))

    def test_routing_settings(self):
        """
        routing_strategy defaults to cache-aware and takes LiteLLM's names;
        metrics_interval defaults to 1 s; session_header to x-session-id,
        kept lower-case; a wrong value names the setting and the choices.
        """
        router = config_from_dict({}).router
        self.assertEqual((router.routing_strategy, router.metrics_interval, router.session_header),
                         ("cache-aware", 1.0, "x-session-id"))
        for name in ("cache-aware", "load-aware", "least-busy", "simple-shuffle"):
            self.assertEqual(config_from_dict({"router_settings": {"routing_strategy": name}}).router.routing_strategy, name)
        router = config_from_dict({"router_settings": {"metrics_interval": 0.5, "session_header": "X-Conversation"}}).router
        self.assertEqual((router.metrics_interval, router.session_header), (0.5, "x-conversation"))
        self.assertIn("router_settings.routing_strategy: expected one of cache-aware, load-aware, least-busy, simple-shuffle",
                      self.failure({"router_settings": {"routing_strategy": "usage-based-routing"}}))
        self.assertIn("router_settings.metrics_interval: must be >= 0.05", self.failure({"router_settings": {"metrics_interval": 0}}))
        self.assertIn("router_settings.session_header: expected an HTTP header name",
                      self.failure({"router_settings": {"session_header": "bad header"}}))

    def test_flow_control_switch(self):
        """
        router_settings.flow_control defaults to true, takes YAML's
        booleans and their usual spellings, and refuses anything else,
        naming the setting.
        """
        self.assertIs(config_from_dict({}).router.flow_control, True)
        for value, expected in ((False, False), ("off", False), ("no", False), (True, True), ("on", True)):
            router = config_from_dict({"router_settings": {"flow_control": value}}).router
            self.assertIs(router.flow_control, expected, value)
        self.assertIn("router_settings.flow_control", self.failure({"router_settings": {"flow_control": "sometimes"}}))

    def test_callbacks(self):
        """
        callbacks default to none, are kept in order, and an unknown or
        repeated sink is an error; the whole section is kept for the sinks.
        """
        self.assertEqual(config_from_dict({}).callbacks, ())
        settings = {"callbacks": ["redis_stream", "json_log"], "json_log": {"path": "calls.jsonl"}}
        config = config_from_dict({"dheera_ai_settings": settings})
        self.assertEqual(config.callbacks, ("redis_stream", "json_log"))
        self.assertEqual(config.dheera_ai_settings, settings)
        self.assertIn("dheera_ai_settings.callbacks[1]: unknown log sink langfuse", self.failure({"dheera_ai_settings": {"callbacks": ["json_log", "langfuse"]}}))
        self.assertIn("listed twice", self.failure({"dheera_ai_settings": {"callbacks": ["json_log", "json_log"]}}))
        self.assertIn("expected a list of log sinks", self.failure({"dheera_ai_settings": {"callbacks": "json_log"}}))


class SecretTests(ConfigTestMixin, SynchronousTestCase):
    """
    Secrets never appear in errors or in the values' repr.
    """

    def test_secretNotInErrors(self):
        """
        Errors about api_key, master_key and values read from the
        environment name the field but never contain the secret.
        """
        secret = "sk-very-secret-value 42"
        environ = {"K": secret}
        cases = [
            {"model_list": [entry(api_key=secret)]},
            {"model_list": [entry(api_key="os.environ/K")]},
            {"general_settings": {"master_key": secret}},
            {"general_settings": {"master_key": "os.environ/K"}},
            {"general_settings": {secret: 1}},
            {"model_list": [entry(**{secret: 1})]},
        ]
        for data in cases:
            message = self.failure(data, environ=environ)
            self.assertNotIn("very-secret", message)
        message = self.failure({}, environ={"DHEERA_AI_MASTER_KEY": secret})
        self.assertNotIn("very-secret", message)

    def test_secretNotInRepr(self):
        """
        The repr of a config (which may end up in a log) holds no api_key,
        master_key or database_url.
        """
        data = {
            "model_list": [entry(api_key="tok-secret")],
            "general_settings": {"master_key": "sk-admin-secret", "database_url": "redis://:pw-secret@h"},
        }
        text = repr(config_from_dict(data))
        self.assertNotIn("secret", text)
        self.assertIsInstance(hash(config_from_dict(data)), int)
        self.assertIsInstance(config_from_dict(data), ProxyConfig)
