"""
nginx for the benchmark, always with its own prefix, config, pid file and
logs in a temporary directory (never the system nginx), one worker,
loopback only.

Two roles:

* the fast non-streaming upstream: every request gets a fixed vLLM-shaped
  chat completion (``return 200 '...'``);
* the reverse-proxy ceiling: ``proxy_pass`` with upstream keep-alive,
  ``/vllm/<path>`` to ``<upstream>/<path>``, unbuffered so SSE chunks and
  large bodies stream through.
"""

import os
from typing import Dict

from upstream import COMPLETION

_COMMON = """\
worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
{user}
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
{servers}
}}
"""

_UPSTREAM_SERVER = """\
    server {{
        listen 127.0.0.1:{port} backlog=4096 reuseport;
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}
"""

_PROXY_SERVER = """\
    upstream {name} {{
        server 127.0.0.1:{target};
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        location /vllm/ {{
            proxy_pass http://{name}/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
    }}
"""


def _write(prefix: str, servers: str) -> str:
    os.makedirs(os.path.join(prefix, "tmp"), exist_ok=True)
    # Workers drop to "nobody" when the master runs as root; keep them root
    # so they can use the private prefix without loosening its permissions.
    user = "user root;" if os.geteuid() == 0 else ""
    path = os.path.join(prefix, "nginx.conf")
    with open(path, "w") as f:
        f.write(_COMMON.format(prefix=prefix, user=user, servers=servers))
    return path


def upstream_config(prefix: str, port: int) -> str:
    """
    Write the config of the fixed-JSON upstream.

    :return: the config's path.
    """
    body = COMPLETION.decode()
    assert "'" not in body
    return _write(prefix, _UPSTREAM_SERVER.format(port=port, body=body))


def proxy_config(prefix: str, routes: Dict[int, int]) -> str:
    """
    Write the config of the reverse-proxy ceiling.

    :param routes: listening port -> upstream port.
    :return: the config's path.
    """
    servers = "".join(
        _PROXY_SERVER.format(name=f"up{i}", port=port, target=target) for i, (port, target) in enumerate(routes.items())
    )
    return _write(prefix, servers)


def command(prefix: str, config: str) -> list:
    """
    :return: the command line running nginx in the foreground.
    """
    return ["nginx", "-p", prefix, "-c", config, "-e", os.path.join(prefix, "error.log")]
