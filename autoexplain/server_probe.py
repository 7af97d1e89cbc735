"""One look at an OpenAI-compatible server before a run uses it: no retries, in about a second.

`preflight.check_llm` asks it for every explainer, simulator and scorer spec that names a server, so
that a wrong URL, key or model, or a server without prompt logprobs for the all-at-once simulator,
stops the run before any recording, with one line.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import urllib.error
import urllib.request

from autoexplain.errors import UserError
from autoexplain.llm import KEY_ENV

# The prompt of the one request that asks a server whether it returns prompt logprobs (a test
# server tells it from the stage's requests by it).
ECHO_PROBE = "autoexplain preflight: echo logprobs?"


def _ask(url: str, key: str | None, body: dict | None = None):
    """One request to the server, no retries: (HTTP status, parsed JSON body or None)."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def _server_message(reply) -> str:
    err = reply.get("error", reply) if isinstance(reply, dict) else None
    msg = (err.get("message") or err.get("detail")) if isinstance(err, dict) else err
    return " ".join(str(msg or "").split())[:160]


def key_fix(key_env: str) -> str:
    """What to do about a key a server refused, read from `key_env` (`registry.LLMSpec.key_env`)."""
    return (f"set a valid key in ${key_env}, or name the variable that holds this server's key after '#' in the "
            "LLM spec ('openai:MODEL@URL#MY_KEY')" if key_env == KEY_ENV else f"set a valid key in ${key_env}")


def _refuse_a_refused_key(url: str, status: int, reply, key_env: str) -> None:
    if status in (401, 403):
        raise UserError(f"the LLM server at {url} refused the API key (HTTP {status}): {_server_message(reply)}",
                        key_fix(key_env))


def probe_server(url: str, model: str, key: str | None, needs_echo: bool, key_env: str = KEY_ENV) -> None:
    """The server's model list (GET /models: a refused key, a model it does not list), then, for a
    simulator that reads prompt logprobs, one tiny echo request. An answer that says nothing for
    sure (5xx, 429, no model list) is left for the stage, whose retries deal with it."""
    base = url.rstrip("/")
    try:
        status, reply = _ask(f"{base}/models", key)
        if status == 404:  # every OpenAI-compatible server lists its models: nothing here speaks the API
            hint = "" if base.endswith("/v1") else f"did you mean {base}/v1? "
            raise UserError(f"no OpenAI-compatible API at {url} (GET {base}/models: HTTP 404)",
                            f"{hint}the URL after '@' is the API's root, as in 'openai:{model}@http://HOST:PORT/v1'")
        _refuse_a_refused_key(url, status, reply, key_env)
        data = reply.get("data") if status == 200 and isinstance(reply, dict) else None
        served = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
        if served and model not in served:
            shown = ", ".join(map(str, served[:8])) + (", ..." if len(served) > 8 else "")
            raise UserError(f"the LLM server at {url} serves no model '{model}' (it serves {shown})",
                            f"use one of those: 'openai:{served[0]}@{url}'")
        if not needs_echo:
            return
        status, reply = _ask(f"{base}/completions", key, {"model": model, "prompt": ECHO_PROBE, "echo": True,
                                                          "logprobs": 1, "max_tokens": 1, "temperature": 0})
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"the LLM server at {url} is not reachable ({reason})",
                        "start the server, or fix the URL after '@'") from None
    _refuse_a_refused_key(url, status, reply, key_env)
    if status == 404:
        raise UserError(f"the LLM server at {url} has no model '{model}' or no /completions (HTTP 404): "
                        f"{_server_message(reply)}", f"check the model name (GET {base}/models lists them)")
    if status in (400, 422) or status == 200:
        choices = reply.get("choices") if isinstance(reply, dict) else None
        lp = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
        if not (isinstance(lp, dict) and lp.get("tokens") and lp.get("top_logprobs")):
            said = f" (HTTP {status}: {_server_message(reply)})" if status != 200 else ""
            raise UserError(f"the LLM server at {url} returns no prompt logprobs for '{model}'{said}, "
                            "which the all-at-once simulator reads",
                            "serve the model where /v1/completions takes echo=True with logprobs (vLLM, llama.cpp), "
                            "or use 'chat-json:LLM'")


DASK_SCHEMES = ("tcp", "tls", "ws", "wss")  # the dask comm protocols that reach a scheduler over the network


def probe_scheduler(address: str, timeout: float = 3.0) -> None:
    """One TCP connection to a dask scheduler's address ('tcp://HOST:PORT', or 'HOST:PORT'; also
    tls, ws and wss), then one `identity` call, no retries: an address where nothing listens, or
    something that is no scheduler, is one line now, not a 30 s wait after the recording."""
    from urllib.parse import urlsplit

    url = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = url.hostname, url.port
    except ValueError:
        host, port = None, None
    if url.scheme not in DASK_SCHEMES or not host or not port:
        raise UserError(f"'{address}' is not a dask scheduler address", "write it as tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"no dask scheduler answers at {address} ({e.strerror or e})",
                        "start the scheduler (`dask scheduler`), or fix the address") from None
    _ask_scheduler(f"{url.scheme}://{host}:{port}", address, timeout, _connection_args(url.scheme, address))


def _connection_args(scheme: str, address: str) -> dict:
    """What a dask client of this process connects with: for tls and wss, the certificates that
    dask's configuration names (`distributed.comm.tls.*`), which prefect-dask's client takes too."""
    from distributed.security import Security

    args = Security().get_connection_args("client")
    if scheme in ("tls", "wss") and args.get("ssl_context") is None:
        raise UserError(f"{address} needs TLS, and dask's configuration names no certificates to connect with",
                        "set distributed.comm.tls.ca-file, .client.cert and .client.key in dask's configuration "
                        "(or DASK_DISTRIBUTED__COMM__TLS__CA_FILE and the like), as the cluster's clients have them")
    return args


def _ask_scheduler(url: str, address: str, timeout: float, connection_args: dict) -> None:
    """Ask what answers there (dask's `identity` call): something that listens but is no dask
    scheduler (a web server, a dask worker) would leave prefect-dask waiting 30 s or more."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.core import rpc

    async def identity():
        async with rpc(url, timeout=timeout, connection_args=connection_args) as scheduler:
            return await asyncio.wait_for(scheduler.identity(), timeout)

    fix = "give the scheduler's address (`dask scheduler` prints it), e.g. tcp://10.0.0.5:8786"
    with ThreadPoolExecutor(1) as thread:  # a loop of its own: the caller may be in one (a flow's)
        try:
            reply = thread.submit(asyncio.run, identity()).result()
        except Exception as e:  # noqa: BLE001 - whatever it is, it does not speak dask
            said = " ".join(str(e).split())[:120]
            raise UserError(f"something listens at {address}, but no dask scheduler answers there "
                            f"({type(e).__name__}{': ' + said if said else ''})", fix) from None
    kind = reply.get("type") if isinstance(reply, dict) else None
    if kind != "Scheduler":
        raise UserError(f"{address} is a dask {kind or 'server'}, not a scheduler", fix)


def _addresses(host: str) -> set[str] | None:
    """The IP addresses `host` (a name or an address) stands for here; None when it resolves to none."""
    try:
        return {info[4][0].split("%")[0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return None


def _is_loopback(host: str) -> bool:
    found = _addresses(host)
    return bool(found) and all(ipaddress.ip_address(a).is_loopback for a in found)


def check_workers_reach(worker_hosts, api_url: str) -> None:
    """Dask workers report their task runs to the Prefect API whose URL the flow gives them. One on
    another machine cannot reach an API on this machine's loopback (Prefect's temporary server always
    is), and its tasks would fail only once the run reached them, after the recording: say so now.
    A worker host that does not resolve here is let through (nothing proves it remote)."""
    import psutil

    from urllib.parse import urlsplit

    if not _is_loopback(urlsplit(api_url).hostname or ""):
        return
    here = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}
    away = sorted(h for h in set(worker_hosts) - {None}
                  if (found := _addresses(h)) and not any(ipaddress.ip_address(a).is_loopback or a in here for a in found))
    if away:
        named = ", ".join(away[:3]) + (f" and {len(away) - 3} more" if len(away) > 3 else "")
        raise UserError(f"the scheduler's workers at {named} run on other machines, and this run's Prefect API "
                        f"({api_url}) is on this machine's loopback, where they cannot report their tasks",
                        "start a Prefect server they can reach (`prefect server start --host 0.0.0.0`) and set "
                        "PREFECT_API_URL to its address on your network, e.g. http://10.0.0.5:4200/api")
