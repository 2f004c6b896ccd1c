"""FedBuff's server part (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
arXiv 2106.06639, Algorithm 1), event-driven on the simulated clock (``fedsim.engine.clock``; the scenario's
``[system]`` section, or the default fleet without one).

``strategy.concurrency`` clients train at any time. Each starts at a simulated time t with the global model of
that moment (version v) and answers at t + download + compute + upload of its device (``ctx.clock.last``). Events
are processed in simulated-time order: an arrival adds s(tau) Delta_i to the buffer (tau = current version - v,
s(tau) = 1 / sqrt(1 + tau)); after ``buffer_size`` K arrivals the server steps x <- x - eta_g * (1/K) sum s(tau_i)
Delta_i (``protocol.server_step``), the version advances, and the model is evaluated (every ``evaluation.every``
versions and the last) and logged at that simulated time. Every arrival, drop or failure frees a slot, and a new
client, drawn (seeded) among those online and not training, starts at once with the current model (when none is
online, when the first comes online). ``rounds`` counts server updates. A dropped client (deadline, offline) frees
its slot when it is dropped (at the deadline, or when it went offline); a failed one at once, and it is not drawn
again before the next server update (else a failing client could be redrawn forever at one instant).

The client's real training runs when it starts (``ctx.send`` to that one client), which is exact: the model it
receives is the model at its start time, since every earlier event has been processed. summary.json adds
``mean_staleness`` and ``max_staleness`` over the aggregated updates. Messages: ``fedsim.algorithms.fedbuff.protocol``.

After each server update the run checkpoints (``ctx.checkpoint``, ``fedsim.engine.checkpoint``) the model, the
pending events (the replies of the clients still in flight included), the buffer, the busy and failed clients and
the event and draw counters; the engine adds the clock, so ``fedsim run --resume`` continues after the last update.
"""

from __future__ import annotations

import heapq

import numpy as np

from fedsim.algorithms.fedbuff import protocol
from fedsim.engine import ServerContext
from fedsim.frameworks.model_rounds_protocol import LocalTraining
from fedsim.nn.training import arrays_to_state, evaluate, state_to_arrays

ARRIVE, FREE, START = 0, 1, 2  # event kinds (at equal times: arrivals first, then freed slots, then starts)


class FedBuffServer:
    resumes_mid_run = True  # --resume continues after the last server update (``fedsim.engine.checkpoint``)

    def __init__(self, params: protocol.FedBuffParams) -> None:
        self.params = params

    def run(self, ctx: ServerContext) -> None:
        p, cfg, clock = self.params, ctx.config, ctx.start_clock()
        concurrency = cfg.num_clients if p.concurrency is None else p.concurrency
        clock.asynchronous = True
        test = ctx.test_data()
        net = ctx.initial_model()
        model = state_to_arrays(net)
        training = LocalTraining.from_settings(cfg.client)
        every, rounds = cfg.evaluation.every, cfg.rounds
        ctx.set_total_steps(rounds)
        events: list[tuple] = []
        count = {"order": 0, "starts": 0}  # events pushed (ties in the heap), clients started (their draws)
        busy: set[int] = set()
        version = 0
        buffer: list[protocol.UpdateReply] = []
        taus: list[int] = []
        seen_taus: list[int] = []

        def log(step: int) -> None:
            if step % every and step != rounds:
                ctx.log(step)
                return
            arrays_to_state(net, model)
            res = evaluate(net, test.x, test.y, batch_size=cfg.evaluation.batch_size, device=ctx.device)
            ctx.log(step, accuracy=res["accuracy"], loss=res["loss"], **ctx.client_accuracy(res["class_accuracy"]))

        failed: set[int] = set()  # clients that failed since the last server update: not drawn again before it
        waiting = [False]  # a START event is pending (nobody was online)

        def start(t: float) -> bool:
            """Start one client at t; False when none can start (a START is then scheduled for when one comes
            online, if one ever does)."""
            idle = [pid for pid in range(cfg.num_clients) if pid not in busy and pid not in failed]
            online = [pid for pid in idle if clock.fleet.availability.is_online(pid, t)]
            if not online:
                later = min((clock.fleet.availability.next_online(pid, t) for pid in idle), default=float("inf"))
                if later != float("inf") and not waiting[0]:
                    waiting[0] = True
                    heapq.heappush(events, (later, START, _tick(count, "order"), -1, version, None))
                return False
            rng = np.random.default_rng(ctx.derive_seed("fedbuff-sample", _tick(count, "starts")))
            pid = int(online[int(rng.integers(len(online)))])
            clock.start_at = t
            (answer,) = ctx.send(protocol.request(model, training), partitions=[pid], round=version + 1) or (None,)
            timing = clock.last.get(pid)
            if answer is not None and answer.ok and timing is not None:
                busy.add(pid)
                heapq.heappush(events, (timing.finish, ARRIVE, _tick(count, "order"), pid, version, answer.content))
            elif timing is not None:  # dropped: busy until it missed the deadline or went offline
                busy.add(pid)
                when = min(timing.finish, clock.fleet.availability.online_until(pid, t),
                           t + (clock.system.deadline_s or float("inf")))
                heapq.heappush(events, (when, FREE, _tick(count, "order"), pid, version, None))
            else:  # failed (injected or crashed): its slot is free at once
                failed.add(pid)
            return True

        def fill(t: float) -> None:
            while len(busy) < concurrency and start(t):
                pass

        resumed = ctx.checkpoint.resume()  # --resume: the state after the interrupted run's last server update
        if resumed is None:
            log(0)
            fill(0.0)
        else:
            model, version, events = resumed["model"], resumed["round"], resumed["events"]
            buffer, taus, seen_taus = resumed["buffer"], resumed["taus"], resumed["seen_taus"]
            busy.update(resumed["busy"])
            failed.update(resumed["failed"])
            waiting[0] = resumed["waiting"]
            count.update(resumed["count"])
            if version < rounds:  # what followed that update's checkpoint
                fill(clock.now)
        while events and version < rounds:
            t, kind, _, pid, started, content = heapq.heappop(events)
            clock.now = max(clock.now, t)
            busy.discard(pid)
            if kind == START:
                waiting[0] = False
            if kind == ARRIVE:
                buffer.append(protocol.parse_reply(content))
                taus.append(version - started)
                if len(buffer) == p.buffer_size:
                    model = protocol.server_step(model, buffer, taus, p.server_lr, p.staleness)
                    version += 1
                    seen_taus.extend(taus)
                    buffer, taus = [], []
                    failed.clear()
                    log(version)
                    ctx.checkpoint.save(version, {"model": model, "events": events, "buffer": buffer, "taus": taus,
                                                  "seen_taus": seen_taus, "busy": busy, "failed": failed,
                                                  "waiting": waiting[0], "count": count})
            if version < rounds:
                fill(clock.now)
        arrays_to_state(net, model)
        ctx.save_model(net.cpu())
        ctx.summary(num_parameters=int(sum(q.numel() for q in net.parameters())), server_updates=version,
                    mean_staleness=float(np.mean(seen_taus)) if seen_taus else 0.0,
                    max_staleness=int(max(seen_taus, default=0)))


def _tick(counter: dict[str, int], name: str) -> int:
    """The next value of ``counter[name]`` (0, 1, ...), a checkpointable ``itertools.count``."""
    counter[name] += 1
    return counter[name] - 1
