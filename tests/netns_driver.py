"""The driver of tests/test_distributed_netns.py, run inside nsA (`ip netns exec nsA python -m
tests.netns_driver ARGS_JSON`): it joins the Ray cluster by address, loads the model as a 2-stage
pipeline and reports on stdout, one `NETNS {json}` line per event (Ray may print too).

mode "tokens": logits of `ids` and greedy tokens of ids[:8] (saved to `out` as .npz).
mode "fail":   3 tokens, then waits for a line on stdin (the test breaks a machine meanwhile), then
               the rest of the generation: the StageFailedError (its text, how long it took, what
               the engine says when used again, each stage actor's state) or "completed".
"""
import json
import sys
import time

import numpy as np


def say(event: str, **kw) -> None:
    print("NETNS " + json.dumps(dict(event=event, **kw)), flush=True)


def state(actor) -> str:
    """A stage actor after the failure: "dead" (shut down, or lost with its node), "alive", or
    "no answer" (its node unreachable and Ray not yet told)."""
    import ray

    try:
        ray.get(actor.ping.remote(), timeout=10)
        return "alive"
    except ray.exceptions.RayActorError:
        return "dead"
    except ray.exceptions.GetTimeoutError:
        return "no answer"


def main(args: dict) -> None:
    from weightstream.engine import Engine
    from weightstream.engine.errors import StageFailedError
    from weightstream.engine.runtime.distributed import DistributedConfig

    cfg = DistributedConfig(address=args["address"], stages=2, layer_ranges=[(0, 2), (2, 4)],
                            transport=args["transport"], timeout_s=args["timeout_s"], load_timeout_s=120)
    t0 = time.monotonic()
    eng = Engine.load(args["model"], stream="experts", distributed=cfg, **args["opts"])
    p = eng.model
    say("loaded", load_s=time.monotonic() - t0, transport=p.transport, note=p.transport_note,
        nodes=[i["ip"] for i in p.infos])
    ids = args["ids"]
    if args["mode"] == "tokens":
        logits, tokens = eng.logits(ids), list(eng.generate_tokens(ids[:8], args["n"]))
        np.savez(args["out"], logits=logits, tokens=np.array(tokens))
        say("done")
    else:
        actors = list(p.stages)
        gen = eng.generate_tokens(ids[:8], args["n"])
        say("midway", tokens=[next(gen) for _ in range(3)])
        sys.stdin.readline()  # the machine is broken now
        t0 = time.monotonic()
        try:
            rest = list(gen)
        except StageFailedError as e:
            elapsed = time.monotonic() - t0
            try:
                eng.logits(ids[:4])
                after = "the engine still ran"
            except StageFailedError as e2:
                after = str(e2)
            say("failed", error=str(e), elapsed_s=elapsed, after=after, stages=[state(a) for a in actors])
        else:
            say("completed", tokens=rest, elapsed_s=time.monotonic() - t0)
    eng.close()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
