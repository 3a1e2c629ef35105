"""
Checks of single configuration values: each takes what YAML gave and
returns the value the proxy uses, or raises L{InvalidValue} saying what is
wrong without quoting the value (it may be a secret).  L{dheera_tx.config}
applies them field by field and says where the value was.
"""

import math
import re
from typing import Any, Callable, Optional, Tuple
from urllib.parse import urlsplit

_HOSTED_VLLM = "hosted_vllm/"
# LiteLLM provider prefixes that name something other than a vLLM server.
# Only these are refused: served names often contain "/" ("Qwen/Qwen2.5-7B").
_OTHER_PROVIDERS = frozenset(
    """openai text-completion-openai custom_openai openai_like azure azure_ai
    azure_text anthropic bedrock sagemaker sagemaker_chat vertex_ai
    vertex_ai_beta gemini palm cohere cohere_chat huggingface ollama
    ollama_chat together_ai groq mistral codestral deepseek openrouter
    fireworks_ai replicate perplexity anyscale deepinfra cerebras sambanova
    databricks watsonx nvidia_nim lm_studio llamafile xai vllm litellm_proxy
    ai21 nlp_cloud aleph_alpha baseten cloudflare friendliai triton predibase
    clarifai volcengine dashscope hyperbolic novita featherless_ai""".split()
)


class InvalidValue(Exception):
    """A value is wrong; the caller knows where it is."""


_KINDS = ((type(None), "nothing"), (bool, "true/false"), ((int, float), "a number"), (str, "a string"),
          (list, "a list"), (dict, "a mapping"))


def kind_of(value: Any) -> str:
    """Say what a value is, without quoting it (it may be a secret)."""
    return next((name for cls, name in _KINDS if isinstance(value, cls)), type(value).__name__)


def shown(name: Any) -> str:
    """Quote a key the user wrote: short, and never one that looks like an API key."""
    if isinstance(name, str) and name.startswith("sk-"):
        return "'sk-...'"
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_./-]{1,40}", name):
        return name
    text = repr(name)
    return text if len(text) <= 40 else text[:37] + "..."


def number(minimum: float, inclusive: bool) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise InvalidValue(f"expected a number, got {kind_of(value)}")
        try:
            number = float(value.strip() if isinstance(value, str) else value)
        except (ValueError, OverflowError):
            raise InvalidValue("expected a number, got a string that is not one")
        if not math.isfinite(number):
            raise InvalidValue("expected a finite number")
        if number < minimum or (number == minimum and not inclusive):
            raise InvalidValue(f"must be {'>=' if inclusive else '>'} {minimum:g}")
        return number

    return check


def whole(minimum: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValue(f"expected a whole number, got {kind_of(value)}")
        if value < minimum:
            raise InvalidValue(f"must be >= {minimum}")
        return value

    return check


def flag(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return value.strip().lower() in ("true", "yes", "on", "1")
    if not isinstance(value, bool):
        raise InvalidValue(f"expected true or false, got {kind_of(value)}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"expected a non-empty string, got {kind_of(value)}")
    return value


def one_of(choices: Tuple[str, ...]) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip() not in choices:
            raise InvalidValue("expected one of " + ", ".join(choices))
        return value.strip()

    return check


def header_name(value: Any) -> str:
    """An HTTP header name (RFC 9110 token), kept lower-case."""
    if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value.strip()):
        raise InvalidValue("expected an HTTP header name, e.g. x-session-id")
    return value.strip().lower()


def token(value: Any) -> Optional[str]:
    """A credential sent in a header: printable ASCII, no spaces.  Never quoted."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidValue(f"expected a string (quote it in YAML), got {kind_of(value)}")
    if not re.fullmatch(r"[\x21-\x7e]+", value):
        raise InvalidValue("must be printable ASCII without spaces or control characters")
    return value


def master_key(value: Any) -> Optional[str]:
    key = token(value)
    if key is None or not key.startswith("sk-") or key == "sk-":
        raise InvalidValue("must start with 'sk-' followed by the key")
    return key


def routes(value: Any) -> Tuple[str, ...]:
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list of vLLM routes, got {kind_of(value)}")
    routes = []
    for item in value:
        hint = "expected a list of vLLM routes like v1/load_lora_adapter or v1/responses/*/input_items"
        if not isinstance(item, str) or not item.strip("/ "):
            raise InvalidValue(hint)
        route = item.strip().strip("/")
        # The proxy path was meant: vLLM's route is what follows /vllm.
        route = route[len("vllm/"):] if route.startswith("vllm/") else route
        segments = route.split("/")
        # Routes match exactly, a "*" segment standing for any one segment.
        if any(not s or ("*" in s and s != "*") or re.search(r"[?#\s]", s) for s in segments):
            raise InvalidValue(hint + " (whole segments, * for any one segment)")
        routes.append(route)
    return tuple(routes)


def served_model(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidValue(f"expected the name vLLM serves, e.g. hosted_vllm/qwen2.5-7b-instruct, got {kind_of(value)}")
    if value.startswith(_HOSTED_VLLM):
        if not value[len(_HOSTED_VLLM):].strip():
            raise InvalidValue("names no model after hosted_vllm/")
        return value[len(_HOSTED_VLLM):]
    provider, slash, _ = value.partition("/")
    if slash and provider in _OTHER_PROVIDERS:
        raise InvalidValue(f"provider prefix {provider}/ is not supported, this gateway only talks to vLLM: write hosted_vllm/"
                       f"<served name> (if vLLM serves the name {value} itself, write hosted_vllm/{value})")
    return value


_BASE_HINT = "must be an http:// or https:// URL of the vLLM server root, e.g. http://127.0.0.1:8000"


def api_base(value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidValue(f"expected a URL, got {kind_of(value)}")
    if not re.fullmatch(r"[\x21-\x7e]+", value):
        raise InvalidValue(_BASE_HINT + " (no spaces or control characters)")
    if "@" in value.partition("://")[2].partition("/")[0]:
        raise InvalidValue("must not hold a user or password: put the key in api_key")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading .port raises ValueError on a bad port
    except ValueError:
        raise InvalidValue(_BASE_HINT + " (it does not parse as one)")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not value[len(scheme):].startswith("://"):
        raise InvalidValue(_BASE_HINT)
    if not parts.hostname:
        raise InvalidValue(_BASE_HINT + " (it names no host)")
    if "?" in value or "#" in value:
        raise InvalidValue("must not have a query string or fragment: request paths are appended to it")
    return scheme + value[len(scheme):].rstrip("/")


def lora_adapters(value: Any) -> Tuple[Tuple[str, Optional[float], Optional[float]], ...]:
    """
    A deployment's C{lora_adapters}: a list whose items are an adapter's
    name (as vLLM serves it, C{--lora-modules NAME=PATH}) or a mapping
    C{{name, input_cost_per_token, output_cost_per_token}} for an adapter
    priced apart from its base model.

    :return: C{(name, input cost or None, output cost or None)} per adapter.
    """
    if not isinstance(value, list):
        raise InvalidValue(f"expected a list of adapter names, got {kind_of(value)}")
    adapters: list = []
    for item in value:
        costs: dict = {}
        if isinstance(item, dict):
            unknown = sorted(str(k) for k in item if k not in ("name", "input_cost_per_token", "output_cost_per_token"))
            if unknown:
                raise InvalidValue(f"unknown adapter field {unknown[0]}; expected name, input_cost_per_token, output_cost_per_token")
            name = item.get("name")
            for field in ("input_cost_per_token", "output_cost_per_token"):
                if item.get(field) is not None:
                    costs[field] = number(0, inclusive=True)(item[field])
        else:
            name = item
        if not isinstance(name, str) or not name.strip() or len(name) > 256 or name != name.strip():
            raise InvalidValue("expected adapter names: non-empty strings of at most 256 characters without surrounding spaces")
        if any(name == existing[0] for existing in adapters):
            raise InvalidValue(f"adapter {name} is listed twice")
        adapters.append((name, costs.get("input_cost_per_token"), costs.get("output_cost_per_token")))
    return tuple(adapters)
