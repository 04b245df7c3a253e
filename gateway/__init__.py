"""`zooter gateway`: an OpenAI-compatible front door that routes each chat request to one expert's endpoint.

- `POST /v1/chat/completions`: `model` is `zooter` (the store's champion router) or `zooter:<router fingerprint>`
  (that router), either optionally ending in `:lambda=<x>` (cost-aware: argmax_i p_i - x * cost_i / max cost, when
  every expert of the router has a cost). Costs and the default lambda are the ones the champion's evaluation
  recorded from its config (as `zooter route` uses them); a `cost` in the experts file overrides an expert's. The
  router reads the conversation's last user message; the request body goes to the chosen expert's
  `<base_url>/chat/completions` unchanged except `model`, which becomes the expert's served model id. A JSON answer
  comes back with `model` = `zooter/<expert>`; a stream (`stream: true`) comes back byte for byte as the expert sent
  it (its chunks name the served model). Both carry `x-zooter-expert` and `x-zooter-router` headers.
- `POST /v1/route`: the same body (only `model` and `messages` are read); answers `{expert, probs, router, lambda}`.
- `GET /v1/models`, `GET /health` (never behind the key), `GET /metrics` (Prometheus text).

Errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 malformed body (`param` names the
field), 401 missing or wrong bearer key, 404 unknown model or router, 408 body too slow, 413 body too large, 429 the
router's queue is full, 502 expert unreachable or failing (names it), 504 expert timed out. An expert's own error
answer is summarised, never relayed (`errors.upstream_status`). Every limit and its default: docs/failures.md.

The champion is re-read from the store's `champion.json` every `reload_s` seconds in the background; a promotion
swaps the router (and its recorded costs and lambda) in once it has loaded, with no restart. Routers are called in
a worker thread of their own, one call at a time per router (a fast tokenizer must not be shared by threads), each
call taking up to 32 of the requests queued for it.

Modules: `app` (the FastAPI app and `serve`), `routers` (the champion's routing policy and the loaded routers),
`experts` (endpoints and local experts), `errors` (the OpenAI error shape).
"""
