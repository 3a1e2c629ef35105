"""
A simulated vLLM replica, for routing tests and the routing benchmark: it
models what decides an LLM fleet's speed, in simulated time (timers, not
computation), so that its ratios hold on a loaded machine.

  - a prefix cache of fixed-size token blocks, hash-chained (a block's hash
    covers every token before it), LRU, of fixed capacity;
  - prefill that costs time per I{uncached} prompt token, one request at a
    time per replica;
  - at most C{max_num_seqs} running requests, the rest in a FIFO waiting
    queue;
  - decode paced at one token per C{decode_interval} per request;
  - C{usage.prompt_tokens_details.cached_tokens} in every answer;
  - C{/metrics} with vLLM's names and label sets (C{model_name}, C{engine}):
    C{vllm:num_requests_running}, C{vllm:num_requests_waiting},
    C{vllm:kv_cache_usage_perc} (C{vllm:gpu_cache_usage_perc} with
    C{legacy_names}, like old servers), C{vllm:prefix_cache_queries_total},
    C{vllm:prefix_cache_hits_total} (tokens, like vLLM),
    C{vllm:cache_config_info}, C{vllm:lora_requests_info},
    C{vllm:engine_sleep_state};
  - LoRA adapters in C{max_lora} slots and sleep mode (C{/sleep},
    C{/wake_up}, C{/is_sleeping}), in L{tests.sim_adapters}.

Text is tokenized as C{chars_per_token} characters per token; chat messages
are rendered C{<|role|>\\ncontent\\n} each, then C{<|assistant|>\\n}.  A
finished request's prompt and output go into the cache, as vLLM caches
generated blocks too, so a conversation's next turn finds its history.

Started with vLLM's queue caps (C{SimSettings.max_num_queued_reqs},
C{max_num_queued_tokens}), a replica refuses the calls it cannot queue as
vLLM does (L{tests.vllm_admission}): unfinished are its waiting and running
sequences, in prefill those not yet given their first token.

Run replicas on their own: C{python -m tests.sim_vllm --replicas 4} prints
one C{http://127.0.0.1:PORT} line per replica.
"""

import argparse
import collections
import hashlib
import json
import math
import sys
from typing import Callable, List, Optional, Tuple

import attr
from twisted.internet import reactor as global_reactor
from twisted.web import resource, server

from tests.sim_adapters import LOAD, READY, LoraSlots, SleepSwitch, sleep_route
from tests.vllm_admission import AdmissionControl, refusal_body, requested_sequences


@attr.s(frozen=True, auto_attribs=True)
class SimSettings:
    """
    A replica's model.  Times in seconds.
    """

    model: str = "sim"
    block_size: int = 16
    cache_blocks: int = 4096
    max_num_seqs: int = 8
    prefill_per_token: float = 0.0001
    prefill_overhead: float = 0.002
    decode_interval: float = 0.01
    chars_per_token: int = 4
    api_key: Optional[str] = None
    legacy_names: bool = False
    # LoRA (tests.sim_adapters): the adapters served beside the base model,
    # the slots (0: LoRA off) and the time one load takes.
    lora_adapters: Tuple[str, ...] = ()
    max_lora: int = 0
    lora_load_time: float = 0.05
    # Whether vllm:engine_sleep_state is exported (older vLLM: not).
    sleep_metric: bool = True
    # vLLM's --max-num-queued-reqs and --max-num-queued-tokens.
    max_num_queued_reqs: Optional[int] = None
    max_num_queued_tokens: Optional[int] = None


DEFAULT_SETTINGS = SimSettings()


class PrefixCache:
    """
    Fixed-capacity LRU of block hashes.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._blocks: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def hits(self, hashes: List[bytes]) -> int:
        """
        :return: how many leading blocks are cached (they become most
            recently used, the first block last).
        """
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        self._touch(hashes[:n])
        return n

    def _touch(self, hashes: List[bytes]) -> None:
        # Like vLLM, which frees a request's blocks tail first: a prompt's
        # tail is evicted before its head, so shared prefixes live longest.
        for h in reversed(hashes):
            self._blocks.move_to_end(h)

    def insert(self, hashes: List[bytes]) -> None:
        """
        Cache these blocks (most recently used, the first block last).
        """
        for h in reversed(hashes):
            if h in self._blocks:
                self._blocks.move_to_end(h)
            else:
                self._blocks[h] = None
                if len(self._blocks) > self.capacity:
                    self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()


def block_hashes(text: str, block_chars: int) -> List[bytes]:
    """
    :return: the chained hashes of the text's whole blocks.
    """
    hashes = []
    previous = b""
    data = text.encode("utf-8", "surrogatepass")
    for start in range(0, len(data) - block_chars + 1, block_chars):
        previous = hashlib.blake2b(previous + data[start:start + block_chars], digest_size=12).digest()
        hashes.append(previous)
    return hashes


def render_chat(messages) -> str:
    """
    :return: the prompt text of chat messages (a fixed template).
    """
    parts = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(f"<|{message.get('role')}|>\n{content or ''}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


class _Sequence:
    __slots__ = ("prompt", "prompt_tokens", "max_tokens", "on_token", "on_done", "generated", "cached", "cancelled",
                 "output", "adapter")

    def __init__(self, prompt: str, prompt_tokens: int, max_tokens: int, on_token, on_done):
        self.prompt = prompt
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.on_token = on_token
        self.on_done = on_done
        self.generated = 0
        self.cached = 0
        self.cancelled = False
        self.output: List[str] = []
        self.adapter: Optional[str] = None


class SimEngine:
    """
    One replica's scheduler, prefix cache and counters.
    """

    def __init__(self, reactor, settings: SimSettings):
        self.reactor = reactor
        self.settings = settings
        self.cache = PrefixCache(settings.cache_blocks)
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.running: List[_Sequence] = []
        self._prefill_queue: collections.deque[_Sequence] = collections.deque()
        self._prefilling = False
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_total = 0
        self.loras = LoraSlots(settings.max_lora)
        self.sleep = SleepSwitch()

    def tokens(self, text: str) -> int:
        return max(1, math.ceil(len(text) / self.settings.chars_per_token))

    def submit(self, prompt: str, max_tokens: int, on_token: Callable[[str], None],
               on_done: Callable[["_Sequence"], None], adapter: Optional[str] = None) -> _Sequence:
        """
        Queue a request; C{on_token(text)} is called per generated token and
        C{on_done(sequence)} at the end (also when cancelled).

        :param adapter: the LoRA adapter it runs with, or L{None}.
        """
        seq = _Sequence(prompt, self.tokens(prompt), max(1, max_tokens), on_token, on_done)
        seq.adapter = adapter
        self.requests_total += 1
        self.waiting.append(seq)
        self._schedule()
        return seq

    def _schedule(self) -> None:
        if self.sleep.asleep:
            return
        skipped = []
        while self.waiting and len(self.running) < self.settings.max_num_seqs:
            seq = self.waiting.popleft()
            if seq.cancelled:
                seq.on_done(seq)
                continue
            if seq.adapter is not None:
                verdict = self.loras.take(seq.adapter)
                if verdict != READY:
                    # Its adapter loads (in the prefill lane) or waits for
                    # a slot; requests behind it go on.
                    if verdict == LOAD:
                        self._prefill_queue.append(seq.adapter)  # type: ignore[arg-type]
                    skipped.append(seq)
                    continue
                self.loras.started(seq.adapter)
            self.running.append(seq)
            self._prefill_queue.append(seq)
        self.waiting.extendleft(reversed(skipped))
        if self.settings.max_lora:
            self.loras.record(self.reactor.seconds(), (q.adapter for q in self.running if q.adapter),
                              (q.adapter for q in self.waiting if q.adapter))
        self._next_prefill()

    def _lora_loaded(self, adapter: str) -> None:
        self._prefilling = False
        self.loras.loaded(adapter)
        self._schedule()
        self._next_prefill()

    def _next_prefill(self) -> None:
        if self._prefilling or not self._prefill_queue:
            return
        seq = self._prefill_queue.popleft()
        if isinstance(seq, str):
            self._prefilling = True
            self.reactor.callLater(self.settings.lora_load_time, self._lora_loaded, seq)
            return
        s = self.settings
        hashes = block_hashes(seq.prompt, s.block_size * s.chars_per_token)
        hit_blocks = self.cache.hits(hashes)
        # vLLM always computes the last prompt token.
        seq.cached = min(hit_blocks * s.block_size, ((seq.prompt_tokens - 1) // s.block_size) * s.block_size)
        self.prefix_queries += seq.prompt_tokens
        self.prefix_hits += seq.cached
        self.prompt_tokens_total += seq.prompt_tokens
        self._prefilling = True
        delay = s.prefill_overhead + (seq.prompt_tokens - seq.cached) * s.prefill_per_token
        self.reactor.callLater(delay, self._prefilled, seq, hashes)

    def _prefilled(self, seq: _Sequence, hashes: List[bytes]) -> None:
        self._prefilling = False
        self.cache.insert(hashes)
        self._next_prefill()
        self._decode(seq)

    def _decode(self, seq: _Sequence) -> None:
        if seq.cancelled or seq.generated >= seq.max_tokens:
            self._finish(seq)
            return
        token = "t%02d " % (seq.generated % 100)
        seq.generated += 1
        seq.output.append(token)
        self.generation_tokens_total += 1
        seq.on_token(token)
        self.reactor.callLater(self.settings.decode_interval, self._decode, seq)

    def _finish(self, seq: _Sequence) -> None:
        s = self.settings
        self.cache.insert(block_hashes(seq.prompt + "".join(seq.output), s.block_size * s.chars_per_token))
        self.running.remove(seq)
        if seq.adapter is not None:
            self.loras.ended(seq.adapter)
        seq.on_done(seq)
        self._schedule()

    def kv_usage(self) -> float:
        s = self.settings
        used = sum(math.ceil((q.prompt_tokens + q.generated) / s.block_size) for q in self.running)
        return min(1.0, used / s.cache_blocks)

    def metrics_text(self) -> bytes:
        """
        :return: C{/metrics} in Prometheus text format, vLLM's names.
        """
        s = self.settings
        labels = f'engine="0",model_name="{s.model}"'
        kv_name = "vllm:gpu_cache_usage_perc" if s.legacy_names else "vllm:kv_cache_usage_perc"
        prefix = "vllm:gpu_prefix_cache" if s.legacy_names else "vllm:prefix_cache"
        lines = []

        def metric(name, kind, help_text, value, sample_labels=labels, suffix=""):
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name}{suffix}{{{sample_labels}}} {float(value)!r}")

        metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", len(self.running))
        metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", len(self.waiting))
        metric(kv_name, "gauge", "KV-cache usage. 1 means 100 percent usage.", self.kv_usage())
        metric(prefix + "_queries", "counter", "Prefix cache queries, in terms of number of queried tokens.",
               self.prefix_queries, suffix="_total")
        metric(prefix + "_hits", "counter", "Prefix cache hits, in terms of number of cached tokens.",
               self.prefix_hits, suffix="_total")
        metric("vllm:prompt_tokens", "counter", "Number of prefill tokens processed.", self.prompt_tokens_total,
               suffix="_total")
        metric("vllm:generation_tokens", "counter", "Number of generation tokens processed.",
               self.generation_tokens_total, suffix="_total")
        info = (f'block_size="{s.block_size}",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
                f'gpu_memory_utilization="0.9",num_gpu_blocks="{s.cache_blocks}"')
        metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", 1.0, info)
        if s.max_lora:
            self.loras.record(self.reactor.seconds(), (q.adapter for q in self.running if q.adapter),
                              (q.adapter for q in self.waiting if q.adapter))
            lines.extend(self.loras.metric_lines())
        else:
            metric("vllm:lora_requests_info", "gauge", "Running stats on lora requests.", self.reactor.seconds(),
                   'max_lora="0",running_lora_adapters="",waiting_lora_adapters=""')
        if s.sleep_metric:
            lines.extend(self.sleep.metric_lines(labels))
        return ("\n".join(lines) + "\n").encode("utf-8")


class SimReplica(resource.Resource):
    """
    The HTTP face of a L{SimEngine}: chat and text completions (streamed
    or not), C{/metrics}, C{/health}, C{/v1/models},
    C{/reset_prefix_cache}.
    """

    isLeaf = True

    def __init__(self, reactor, settings: SimSettings = DEFAULT_SETTINGS):
        super().__init__()
        self.engine = SimEngine(reactor, settings)
        self.settings = settings
        self.admission = AdmissionControl(settings.max_num_queued_reqs, settings.max_num_queued_tokens)

    def render_GET(self, request):
        path = request.path
        if path == b"/metrics":
            request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
            return self.engine.metrics_text() + self._admission_metrics()
        if path == b"/health":
            return b""
        if path == b"/v1/models":
            if not self._authorized(request):
                return self._unauthorized(request)
            cards = [{"id": self.settings.model, "object": "model"}]
            cards += [{"id": name, "object": "model", "parent": self.settings.model} for name in self.settings.lora_adapters]
            return _json(request, 200, {"object": "list", "data": cards})
        answer = sleep_route(self.engine, b"GET", path, request.uri)
        if answer is not None:
            return _json(request, 200, answer)
        return _json(request, 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})

    def render_POST(self, request):
        path = request.path
        if path == b"/reset_prefix_cache":
            self.engine.cache.clear()
            return _json(request, 200, {"success": True})
        answer = sleep_route(self.engine, b"POST", path, request.uri)
        if answer is not None:
            return _json(request, 200, answer)
        if path not in (b"/v1/chat/completions", b"/v1/completions"):
            return _json(request, 404, {"error": {"message": "Not Found", "type": "NotFoundError", "code": 404}})
        if not self._authorized(request):
            return self._unauthorized(request)
        try:
            body = json.loads(request.content.read())
            chat = path == b"/v1/chat/completions"
            prompt = render_chat(body["messages"]) if chat else str(body["prompt"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return _json(request, 400, {"error": {"message": "bad request", "type": "BadRequestError", "code": 400}})
        refused = self._refusal(request, body)
        if refused is not None:
            return refused
        return self._generate(request, body, prompt, chat)

    def _refusal(self, request, body: dict) -> Optional[bytes]:
        """
        vLLM's admission check: the refusal's body (status and headers
        set), or L{None} when the call may queue.
        """
        if not self.admission.capped:
            return None
        engine = self.engine
        unfinished = [seq for seq in (*engine.waiting, *engine.running) if not seq.cancelled]
        in_prefill = sum(seq.prompt_tokens for seq in unfinished if seq.generated == 0)
        reason = self.admission.check(len(unfinished), in_prefill, requested_sequences(body))
        if reason is None:
            return None
        request.setResponseCode(503)
        request.setHeader(b"content-type", b"application/json")
        return refusal_body(reason)

    def _admission_metrics(self) -> bytes:
        return ("\n".join(self.admission.metrics_lines(self.settings.model)) + "\n").encode("utf-8")

    def _authorized(self, request) -> bool:
        key = self.settings.api_key
        return key is None or request.getHeader(b"authorization") == b"Bearer " + key.encode("ascii")

    def _unauthorized(self, request) -> bytes:
        request.setResponseCode(401)
        return b'{"error":"Unauthorized"}'

    def _generate(self, request, body: dict, prompt: str, chat: bool):
        stream = body.get("stream") is True
        include_usage = stream and (body.get("stream_options") or {}).get("include_usage") is True
        max_tokens = int(body.get("max_tokens") or 16)
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": "sim-%d" % self.engine.requests_total, "created": 0, "model": self.settings.model}

        def usage(seq) -> dict:
            return {"prompt_tokens": seq.prompt_tokens, "completion_tokens": seq.generated,
                    "total_tokens": seq.prompt_tokens + seq.generated,
                    "prompt_tokens_details": {"cached_tokens": seq.cached}}

        def piece(text: str, finish=None) -> dict:
            if chat:
                return {"index": 0, "delta": {"content": text}, "finish_reason": finish}
            return {"index": 0, "text": text, "finish_reason": finish}

        def on_token(token: str) -> None:
            if stream and not gone:
                request.write(_sse(dict(head, object=kind + ".chunk" if chat else kind, choices=[piece(token)])))

        def on_done(seq) -> None:
            if gone:
                return
            if stream:
                request.write(_sse(dict(head, object=kind + ".chunk" if chat else kind,
                                        choices=[piece("", "length")])))
                if include_usage:
                    request.write(_sse(dict(head, object=kind + ".chunk", choices=[], usage=usage(seq))))
                request.write(b"data: [DONE]\n\n")
            else:
                text = "".join(seq.output)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
                          if chat else {"index": 0, "text": text, "finish_reason": "length"})
                data = json.dumps(dict(head, object=kind, choices=[choice], usage=usage(seq))).encode()
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"content-length", b"%d" % len(data))
                request.write(data)
            request.finish()

        gone: List[bool] = []
        # Which replica answered, for benchmarks counting calls per replica.
        request.setHeader(b"x-sim-replica", str(request.getHost().port).encode("ascii"))
        if stream:
            request.setHeader(b"content-type", b"text/event-stream")
        model = body.get("model")
        adapter = model if model in self.settings.lora_adapters else None
        seq = self.engine.submit(prompt, max_tokens, on_token, on_done, adapter)

        def left(_):
            gone.append(True)
            seq.cancelled = True

        request.notifyFinish().addErrback(left)
        return server.NOT_DONE_YET


def _sse(document: dict) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def _json(request, status: int, document) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(document).encode()


class _Site(server.Site):
    """
    Keeps its connections, so that tests can close them.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.connections: set = set()

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        lost = protocol.connectionLost

        def connection_lost(reason, protocol=protocol):
            self.connections.discard(protocol)
            return lost(reason)

        protocol.connectionLost = connection_lost
        self.connections.add(protocol)
        return protocol

    def close_connections(self) -> None:
        for protocol in list(self.connections):
            # twisted.web wraps the channel, which holds the transport.
            channel = getattr(protocol, "_channel", protocol)
            if channel.transport is not None:
                channel.transport.abortConnection()


def listen(reactor, settings: SimSettings = DEFAULT_SETTINGS, interface: str = "127.0.0.1"):
    """
    :return: C{(replica, port)} of a replica listening on a free port; the
        replica's C{site.close_connections()} aborts its connections.
    """
    replica = SimReplica(reactor, settings)
    site = replica.site = _Site(replica)
    site.noisy = False
    site.log = lambda request: None
    port = reactor.listenTCP(0, site, interface=interface)
    return replica, port


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--settings", default="{}", help="SimSettings fields as JSON")
    args = parser.parse_args(argv)
    fields = json.loads(args.settings)
    if "lora_adapters" in fields:
        fields["lora_adapters"] = tuple(fields["lora_adapters"])
    settings = SimSettings(**fields)
    for _ in range(args.replicas):
        _, port = listen(global_reactor, settings)
        print("http://127.0.0.1:%d" % port.getHost().port, flush=True)
    global_reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
