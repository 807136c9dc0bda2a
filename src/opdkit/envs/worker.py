"""An environment worker process (see :class:`opdkit.envs.pool.EnvPool`).

Started as ``python -m opdkit.envs.worker KIND...``: imports the modules of those environment kinds, says
``"ready"``, then serves JSON lines on stdin, one reply line per request on the original stdout:

- ``{"op": "reset", "id": k, "kind": ..., "args": {...}}`` -> ``{"id": k, "observation": str, "info": {...}}``
- ``{"op": "step", "id": k, "action": str}`` -> ``{"id": k, "observation", "reward", "done", "info"}``
- ``{"op": "close", "id": k}`` -> ``{"id": k}``

A request that raises is answered ``{"id": k, "error": "Type: message"}``. Whatever the environments print
goes to stderr: stdout carries only the protocol. torch is never imported here.
"""

from __future__ import annotations

import json
import os
import sys


def _jsonable(info) -> dict:
    out = {}
    for key, value in dict(info or {}).items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            out[str(key)] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[str(key)] = list(value)
        else:
            out[str(key)] = str(value)
    return out


def main() -> None:
    import importlib

    from opdkit.envs.base import _REGISTRY, EnvSpec, make_env

    proto = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol keeps the real stdout ...
    os.dup2(2, 1)  # ... and anything the games print (C code included) goes to stderr
    sys.stdout = sys.stderr
    for kind in sys.argv[1:]:
        if kind in _REGISTRY:
            try:
                importlib.import_module(_REGISTRY[kind].partition(":")[0])
            except Exception:  # reported by the first reset of that kind
                pass
    proto.write('"ready"\n')
    envs: dict = {}
    for line in sys.stdin:
        req = json.loads(line)
        k = req.get("id")
        try:
            if req["op"] == "reset":
                env = make_env(EnvSpec(req["kind"], req.get("args") or {}))
                envs[k] = env
                obs = env.reset()
                info = getattr(env, "last_info", None) or {}
                reply = {"id": k, "observation": str(obs), "info": _jsonable(info)}
            elif req["op"] == "step":
                obs, reward, done, info = envs[k].step(str(req["action"]))
                reply = {"id": k, "observation": str(obs), "reward": float(reward), "done": bool(done),
                         "info": _jsonable(info)}
            elif req["op"] == "close":
                env = envs.pop(k, None)
                if env is not None:
                    env.close()
                reply = {"id": k}
            else:
                reply = {"id": k, "error": f"unknown op {req['op']!r}"}
        except Exception as exc:  # the environment's failure is its episode's, reported to the parent
            reply = {"id": k, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
