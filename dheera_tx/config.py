"""
The proxy's configuration: a YAML file in LiteLLM's shape, checked whole at
start-up.

L{load_config} reads the file, replaces every C{os.environ/NAME} string with
that environment variable and returns a L{ProxyConfig} of frozen values, or
raises L{ConfigError}, whose text is one line naming the file, the entry and
the field (start-up prints it and stops; never a traceback).  Errors name
fields, variables and models but never quote a configured value, so a key or
a password in the file cannot leak through one.  The checks of single values
are in L{dheera_tx.config_values}, the settings and their checks in
L{dheera_tx.config_settings}.
"""

import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import attr
import yaml

from dheera_tx import config_values
from dheera_tx.config_settings import (  # noqa: F401 (re-exported: the settings are config's)
    GENERAL_CHECKS,
    PARAM_CHECKS,
    PARAMS,
    ROUTER_CHECKS,
    ROUTING_STRATEGIES,
    Deployment,
    GeneralSettings,
    RouterSettings,
)

ENV_PREFIX = "os.environ/"
SECTIONS = ("model_list", "general_settings", "dheera_ai_settings", "router_settings", "environment_variables")
SINKS = ("json_log", "redis_stream", "webhook")
_ENTRY_KEYS = ("model_name", "dheera_ai_params", "litellm_params", "model_info")


class ConfigError(Exception):
    """
    The configuration cannot be used.  C{str()} is one line,
    C{config error: <file>: <where>: <what>}, and never holds a secret.

    :param message: what is wrong.
    :param path: the config file, if known.
    :param where: the entry and field, e.g.
        C{model_list[1] (my-model): dheera_ai_params.api_base}.
    """

    def __init__(self, message: str, *, path: Optional[str] = None, where: Optional[str] = None):
        text = " ".join(": ".join(part for part in (path, where, message) if part).split())
        if not text.startswith("config error:"):
            text = "config error: " + text
        super().__init__(text)
        self.path = path
        self.where = where
        self.what = message


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ProxyConfig:
    """
    A checked configuration.

    :ivar deployments: every C{model_list} entry, in file order.
    :ivar default_deployment: where calls naming no configured model go, or
        L{None}.
    :ivar callbacks: the log sinks to run.
    :ivar dheera_ai_settings: the whole section (env references resolved),
        for the sinks' own settings.
    """

    path: str
    deployments: Tuple[Deployment, ...] = ()
    default_deployment: Optional[Deployment] = None
    general: GeneralSettings = attr.Factory(GeneralSettings)
    router: RouterSettings = attr.Factory(RouterSettings)
    callbacks: Tuple[str, ...] = ()
    dheera_ai_settings: Dict[str, Any] = attr.ib(factory=dict, repr=False, hash=False)
    _by_name: Dict[str, Tuple[Deployment, ...]] = attr.ib(init=False, repr=False, eq=False)
    _by_adapter: Dict[str, Tuple[Deployment, ...]] = attr.ib(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        by_name: Dict[str, list] = {}
        by_adapter: Dict[str, list] = {}
        for deployment in self.deployments:
            by_name.setdefault(deployment.model_name, []).append(deployment)
            for adapter in deployment.lora_adapters:
                by_adapter.setdefault(adapter[0], []).append(deployment)
        object.__setattr__(self, "_by_name", {name: tuple(group) for name, group in by_name.items()})
        object.__setattr__(self, "_by_adapter", {name: tuple(group) for name, group in by_adapter.items()})

    def adapter_replicas(self, name: str) -> Tuple[Deployment, ...]:
        """
        :return: the deployments whose config declares the LoRA adapter
            C{name}, in file order; empty when none does.
        """
        return self._by_adapter.get(name, ())

    def replicas(self, model_name: str) -> Tuple[Deployment, ...]:
        """
        :return: the deployments serving C{model_name}, in file order; empty
            when it is not a configured model.
        """
        return self._by_name.get(model_name, ())

    def all_deployments(self) -> Tuple[Deployment, ...]:
        """
        :return: every deployment, the default upstream included, each
            once, in file order.
        """
        default = self.default_deployment
        if default is None or default in self.deployments:
            return self.deployments
        return self.deployments + (default,)

    @property
    def model_names(self) -> Tuple[str, ...]:
        """
        :return: the configured model names, each once, in file order.
        """
        return tuple(self._by_name)


# Settings that were replaced: naming one stops start-up with what to write
# instead, rather than being ignored.
_RETIRED = {
    "general_settings": {
        "operator_routes": "virtual keys may now call only the tenant API (chat, completions, responses, "
        "messages, embeddings, pooling, score, rerank, classify, tokenize, detokenize, audio, models, "
        "realtime, invocations) and every other vLLM route needs the master key; delete operator_routes, and list "
        "any route virtual keys must reach beyond the tenant API in general_settings.tenant_routes",
    },
}
# Env-alone settings, used when the file leaves the setting out.
_GENERAL_FROM_ENV = (("master_key", "DHEERA_AI_MASTER_KEY"), ("database_url", "DATABASE_URL"))


class _Reader:
    """
    Checks one configuration, knowing the file (for messages) and the
    environment that C{os.environ/NAME} reads.
    """

    def __init__(self, path: str, environ: Mapping[str, str]):
        self.path = path
        self.base_environ = environ
        self.environ: Mapping[str, str] = environ
        self.exported: Tuple[str, ...] = ()

    def error(self, where: Optional[str], what: str) -> ConfigError:
        return ConfigError(what, path=self.path, where=where)

    def resolve(self, value: Any, where: str, environ: Optional[Mapping[str, str]] = None, _active=frozenset()) -> Any:
        """
        :return: a copy of C{value} with every C{os.environ/NAME} string
            replaced by the variable.
        :raise ConfigError: a variable is not set.
        """
        environ = self.environ if environ is None else environ
        if isinstance(value, str):
            if not value.startswith(ENV_PREFIX):
                return value
            name = value[len(ENV_PREFIX):].strip()
            if not name:
                raise self.error(where, "os.environ/ names no environment variable")
            if name not in environ:
                raise self.error(where, f"environment variable {name} is not set (used as os.environ/{name})")
            return environ[name]
        if isinstance(value, (dict, list)):
            if id(value) in _active:
                raise self.error(where, "a YAML alias contains itself")
            active = _active | {id(value)}
            if isinstance(value, list):
                return [self.resolve(v, f"{where}[{i}]", environ, active) for i, v in enumerate(value)]
            return {k: self.resolve(v, f"{where}.{config_values.shown(k)}", environ, active) for k, v in value.items()}
        return value

    def value(self, where: str, check: Callable[[Any], Any], raw: Any) -> Any:
        try:
            return check(self.resolve(raw, where))
        except config_values.InvalidValue as e:
            raise self.error(where, str(e))

    def section(self, data: dict, name: str) -> dict:
        value = data.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(name, f"expected a mapping, got {config_values.kind_of(value)}")
        return value

    def known(self, mapping: dict, allowed, where: Callable[[Any], str], what: str) -> None:
        for key in mapping:
            if key not in allowed:
                raise self.error(where(key), f"unknown {what}; expected one of {', '.join(allowed)}")

    def env_where(self, name: str) -> str:
        if name in self.exported:
            return f"environment_variables.{name}"
        return f"environment variable {name}"

    def read(self, data: Any) -> ProxyConfig:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise self.error("top level", f"expected a mapping of sections ({', '.join(SECTIONS)}), got {config_values.kind_of(data)}")
        for key in data:
            if key not in SECTIONS:
                hint = "; did you mean dheera_ai_settings?" if key == "litellm_settings" else ""
                raise self.error(config_values.shown(key), f"unknown top-level section; expected one of {', '.join(SECTIONS)}{hint}")
        self.export(self.section(data, "environment_variables"))
        deployments = self.model_list(data.get("model_list"))
        self.check_adapters(deployments)
        settings = self.resolve(self.section(data, "dheera_ai_settings"), "dheera_ai_settings")
        return ProxyConfig(
            path=self.path,
            deployments=deployments,
            default_deployment=self.default_deployment(deployments),
            general=self.settings(data, "general_settings", GeneralSettings, GENERAL_CHECKS, _GENERAL_FROM_ENV),
            router=self.settings(data, "router_settings", RouterSettings, ROUTER_CHECKS, ()),
            callbacks=self.callbacks(settings.get("callbacks")),
            dheera_ai_settings=settings,
        )

    def export(self, variables: dict) -> None:
        merged = dict(self.base_environ)
        for name, raw in variables.items():
            where = f"environment_variables.{config_values.shown(name)}"
            if not isinstance(name, str) or not re.fullmatch(r"[^=\x00]+", name):
                raise self.error(where, "expected an environment variable name")
            value = self.resolve(raw, where, self.base_environ)
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (int, float)):
                value = str(value)
            elif not isinstance(value, str):
                raise self.error(where, f"expected a string or a number, got {config_values.kind_of(value)}")
            merged[name] = value
        self.environ = merged
        self.exported = tuple(variables)

    def model_list(self, entries: Any) -> Tuple[Deployment, ...]:
        if entries is None:
            return ()
        if not isinstance(entries, list):
            raise self.error("model_list", f"expected a list of model entries, got {config_values.kind_of(entries)}")
        return tuple(self.deployment(index, entry) for index, entry in enumerate(entries))

    def check_adapters(self, deployments: Tuple[Deployment, ...]) -> None:
        names = {deployment.model_name for deployment in deployments}
        for deployment in deployments:
            for adapter in deployment.lora_adapters:
                if adapter[0] in names:
                    where = f"model_list[{deployment.index}] ({deployment.model_name}): lora_adapters"
                    raise self.error(where, f"adapter {adapter[0]} has the name of a configured model_name; a name routes to one thing")

    def deployment(self, index: int, entry: Any) -> Deployment:
        label = f"model_list[{index}]"
        if not isinstance(entry, dict):
            raise self.error(label, f"expected a mapping with model_name and dheera_ai_params, got {config_values.kind_of(entry)}")
        self.known(entry, _ENTRY_KEYS, lambda key: f"{label}: {config_values.shown(key)}", "field")
        if entry.get("model_name") is None:
            raise self.error(f"{label}: model_name", "missing; the name clients send as model")
        name = self.value(f"{label}: model_name", config_values.text, entry["model_name"])
        label = f"{label} ({name})"
        if "dheera_ai_params" in entry and "litellm_params" in entry:
            raise self.error(label, "has both dheera_ai_params and litellm_params; keep one")
        if not isinstance(entry.get("model_info") or {}, dict):
            raise self.error(f"{label}: model_info", f"expected a mapping, got {config_values.kind_of(entry['model_info'])}")
        field = "litellm_params" if "litellm_params" in entry else "dheera_ai_params"
        params = entry.get(field)
        if params is None:
            raise self.error(f"{label}: dheera_ai_params", "missing; it holds model and api_base")
        if not isinstance(params, dict):
            raise self.error(f"{label}: {field}", f"expected a mapping of parameters, got {config_values.kind_of(params)}")
        where = lambda key: f"{label}: {field}.{key}"  # noqa: E731
        self.known(params, PARAMS, lambda key: where(config_values.shown(key)), "parameter")
        hints = {"model": "the name vLLM serves, e.g. hosted_vllm/qwen2.5-7b-instruct",
                 "api_base": "the vLLM server root, e.g. http://127.0.0.1:8000"}
        for required, hint in hints.items():
            if params.get(required) is None:
                raise self.error(where(required), f"missing; {hint}")
        values = {key: self.value(where(key), PARAM_CHECKS[key], raw) for key, raw in params.items() if raw is not None}
        values["served_model"] = values.pop("model")
        return Deployment(model_name=name, index=index, **values)

    def settings(self, data: dict, name: str, cls: type, checks: dict, from_env: tuple) -> Any:
        section = self.section(data, name)
        for key, instead in _RETIRED.get(name, {}).items():
            if key in section:
                raise self.error(f"{name}.{key}", f"no longer supported: {instead}")
        self.known(section, checks, lambda key: f"{name}.{config_values.shown(key)}", "setting")
        values = {key: self.value(f"{name}.{key}", checks[key], raw) for key, raw in section.items() if raw is not None}
        for key, variable in from_env:
            if key not in values and self.environ.get(variable):
                values[key] = self.value(self.env_where(variable), checks[key], self.environ[variable])
        return cls(**values)

    def callbacks(self, names: Any) -> Tuple[str, ...]:
        if names is None:
            return ()
        if not isinstance(names, list):
            raise self.error("dheera_ai_settings.callbacks", f"expected a list of log sinks, got {config_values.kind_of(names)}")
        for i, name in enumerate(names):
            where = f"dheera_ai_settings.callbacks[{i}]"
            if name not in SINKS:
                raise self.error(where, f"unknown log sink {config_values.shown(name)}; expected one of {', '.join(SINKS)}")
            if name in names[:i]:
                raise self.error(where, f"log sink {name} is listed twice")
        return tuple(names)

    def default_deployment(self, deployments: Tuple[Deployment, ...]) -> Optional[Deployment]:
        for variable in ("HOSTED_VLLM_API_BASE", "VLLM_API_BASE"):
            if self.environ.get(variable):
                api_base = self.value(self.env_where(variable), config_values.api_base, self.environ[variable])
                key = self.value(self.env_where("HOSTED_VLLM_API_KEY"), config_values.token, self.environ.get("HOSTED_VLLM_API_KEY"))
                return Deployment(model_name="", served_model=None, api_base=api_base, api_key=key, index=-1)
        return deployments[0] if len(deployments) == 1 else None


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"key {config_values.shown(key)} appears twice", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, path: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = ", ".join(part for part in (e.context, e.problem) if part) or "syntax error"
        if mark is None:
            raise ConfigError(problem, path=path, where="invalid YAML")
        raise ConfigError(problem, path=path, where=f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}")
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        what = f"{e.reason} (character U+{e.character:04X})" if isinstance(e.character, int) else e.reason
        raise ConfigError(what, path=path, where=f"invalid YAML at line {line}, column {column}")
    except yaml.YAMLError as e:
        raise ConfigError(str(e), path=path, where="invalid YAML")
    except RecursionError:
        raise ConfigError("nested too deeply", path=path, where="invalid YAML")


def config_from_dict(data: Any, path: str = "<memory>", environ: Optional[Mapping[str, str]] = None) -> ProxyConfig:
    """
    Check an already parsed configuration.

    :param data: the YAML document (L{None} for an empty file).
    :param path: the file name used in error messages.
    :param environ: the environment C{os.environ/NAME} and the env-alone
        settings read; C{environment_variables} are laid over a copy of it,
        never written back.  Empty when not given.
    :raise ConfigError: the configuration cannot be used.
    """
    return _Reader(path, {} if environ is None else environ).read(data)


def load_config(path: str, environ: Mapping[str, str] = os.environ) -> ProxyConfig:
    """
    Read and check the YAML config file at C{path}.

    :param environ: the environment C{os.environ/NAME} references and the
        env-alone settings (C{DHEERA_AI_MASTER_KEY}, C{DATABASE_URL},
        C{HOSTED_VLLM_API_BASE}, ...) are read from.
    :raise ConfigError: the file cannot be read, is not YAML, or describes
        an unusable configuration.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read the file: {e.strerror or e}", path=path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"not UTF-8 text (line {line})", path=path)
    return config_from_dict(_parse_yaml(text, path), path=path, environ=environ)
