"""The `openai` backend: an expert served behind an OpenAI-compatible endpoint (`vllm serve`, TGI, llama.cpp, a
hosted API). One client per Ray actor; no weights load here, the endpoint holds the model.

Same interface as cluster/hf.py `HFGenerator` (`render`, `generate`), so the generate step writes the same cells:
- `chat` prompts go to `/chat/completions` as one user message, so the server applies the model's chat template
  (with the generation prompt), as `render_chat` does in-process; `render` therefore returns the query unchanged.
  On vLLM's server, greedy cells equal the vllm backend's (tests/cluster/test_openai_backend.py).
- template prompts go to `/completions` as text; the server tokenizes them by its own rule (e.g. whether it adds
  BOS), so their first tokens may differ from the in-process backends'.
- Token counts are the response's `usage`; a prompt longer than the served context is the server's error (the
  in-process backends cut it from the left): that row fails alone (`row_failure`).

Requests run concurrently, at most `max_in_flight` per actor. The `openai` client retries each one with
exponential backoff (0.5 s doubling, at most 8 s, honouring Retry-After) on connection errors, timeouts, 408, 409,
429 and 5xx; after `max_retries` retries that request's row fails alone (its error names the expert and URL; a run
fails once more rows failed than `data.max_failed_fraction`), unless no request of the call got through: then the
endpoint counts as down, `EndpointUnavailable`. A rejected request (400, 422: e.g. a prompt over the served context)
fails its row too; a bad key or unknown model (401, 403, 404) is a `ConfigError` at once.

The API key is read from the environment variable `api_key_env` at every `generate` call, in the actor's process:
it is never an argument, a config value or part of anything written.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import openai

from cluster.batches import Generation, failed_row
from schemas.errors import ConfigError, ZooterError

NO_KEY = "EMPTY"  # what the client sends where no key is configured (vLLM's convention; servers without auth ignore it)


class EndpointUnavailable(ZooterError):
    """An expert's endpoint stayed unreachable (or overloaded: 429/5xx) for the whole retry budget."""

    exit_code = 3


def api_key(env: str | None, expert: str) -> str:
    """The key from environment variable `env` (NO_KEY when `env` is None); a ConfigError when it is unset."""
    if env is None:
        return NO_KEY
    key = os.environ.get(env)
    if not key:
        raise ConfigError(f"expert {expert!r}: api_key_env {env} is not set in the environment of the process that "
                          "calls the endpoint (on a Ray cluster: every node's environment)")
    return key


def client(base_url: str, key: str, timeout_s: float, max_retries: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)


def check_endpoint(expert: str, base_url: str, model: str, api_key_env: str | None, timeout_s: float = 5.0) -> None:
    """Preflight: the key's variable is set, and `GET {base_url}/models` (one request, no retry) lists `model`."""
    key = api_key(api_key_env, expert)
    try:
        served = [m.id for m in client(base_url, key, timeout_s, max_retries=0).models.list()]
    except openai.OpenAIError as e:
        raise endpoint_error(e, expert, base_url, model, 1, api_key_env) from None
    if model not in served:
        shown = ", ".join(served[:20]) + (f", ... ({len(served) - 20} more)" if len(served) > 20 else "")
        raise ConfigError(f"expert {expert!r}: {base_url} does not serve model {model!r} (it serves: {shown})")


def endpoint_error(e: openai.OpenAIError, expert: str, base_url: str, model: str, tries: int,
                   api_key_env: str | None) -> ZooterError:
    """The user-facing error for a failed request (after the client's retries)."""
    where = f"expert {expert!r}: {base_url}"
    if isinstance(e, openai.APIConnectionError):  # APITimeoutError included
        return EndpointUnavailable(f"{where}: unreachable after {tries} tries ({type(e).__name__}: {e})")
    if not isinstance(e, openai.APIStatusError):
        return ConfigError(f"{where}: {type(e).__name__}: {e}")
    said = f"{e.status_code}: {e.message.removeprefix(f'Error code: {e.status_code} - ')[:300]}"
    if e.status_code in (408, 409, 429) or e.status_code >= 500:
        return EndpointUnavailable(f"{where}: still answering {said} after {tries} tries")
    if e.status_code in (401, 403):
        return ConfigError(f"{where}: refused the API key ({said}); check api_key_env "
                           f"({api_key_env or 'not set: no key is sent'})")
    if e.status_code == 404:
        return ConfigError(f"{where}: does not serve model {model!r} ({said})")
    return ConfigError(f"{where}: rejected the request ({said})")


def row_failure(e: openai.OpenAIError) -> bool:
    """Whether a failed request fails only its row: unreachable or overloaded after every retry, or a request the
    endpoint rejected (e.g. a prompt longer than its context: 400). A refused key (401/403) or an unknown model
    (404) is every row's problem: the stage stops."""
    return not isinstance(e, openai.APIStatusError) or e.status_code not in (401, 403, 404)


class OpenAIGenerator:
    backend = "openai"

    def __init__(self, expert: str, base_url: str, model: str, chat: bool = True, api_key_env: str | None = None,
                 max_in_flight: int = 8, timeout_s: float = 300.0, max_retries: int = 4):
        """`expert` names the expert in errors; `model` is the served model id; `chat`: prompts are raw queries for
        `/chat/completions` (the `chat` template), else rendered text for `/completions`."""
        self.expert, self.base_url, self.model, self.chat = expert, base_url, model, chat
        self.api_key_env, self.max_in_flight = api_key_env, max_in_flight
        self.timeout_s, self.max_retries = timeout_s, max_retries

    def render(self, query: str) -> str:
        """The query as it is: the server applies the chat template."""
        return query

    def generate(self, prompts: list[str], max_new_tokens: int = 48, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop: list[str] | None = None, batch_size: int = 8) -> list[Generation]:
        """One request per prompt, `max_in_flight` at a time (`batch_size` is not used: the server batches)."""
        api = client(self.base_url, api_key(self.api_key_env, self.expert), self.timeout_s, self.max_retries)
        kw: dict = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature}
        if temperature > 0:  # as the vllm backend: greedy decoding takes no top_p and no seed
            kw.update(top_p=top_p, seed=seed)
        if stops := [s for s in (stop or []) if s]:
            kw["stop"] = stops

        def one(prompt: str) -> Generation | ZooterError:
            try:
                if self.chat:
                    r = api.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
                    text = r.choices[0].message.content or ""
                else:
                    r = api.completions.create(prompt=prompt, **kw)
                    text = r.choices[0].text
            except openai.OpenAIError as e:
                err = endpoint_error(e, self.expert, self.base_url, self.model, self.max_retries + 1,
                                     self.api_key_env)
                if row_failure(e):  # this request's own failure (after the retries): the row fails alone
                    return err
                raise err from None
            if r.usage is None:
                raise ConfigError(f"expert {self.expert!r}: {self.base_url} answered without `usage` (token counts "
                                  "the cells record); use an endpoint that reports it")
            return Generation(text.strip(), r.usage.prompt_tokens, r.usage.completion_tokens,
                              "length" if r.choices[0].finish_reason == "length" else "stop")

        pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix=f"openai-{self.expert}")
        try:
            outs = list(pool.map(one, prompts))
        finally:
            pool.shutdown(cancel_futures=True)  # a failed request: the queued ones never start
        down = [o for o in outs if isinstance(o, EndpointUnavailable)]
        if down and len(down) == len(outs):  # no request got through: the endpoint is down, not one row's fault
            raise down[0]
        return [failed_row(str(o)) if isinstance(o, ZooterError) else o for o in outs]
