"""Where ClientApps really run: in the driver process, or in a pool of Ray actors.

A *task* is one instruction message for one node, with that node's ``Context``, already
serialized (the engine counts the bytes anyway). Executing it deserializes both, seeds
every RNG from the task's seed (so the result does not depend on which worker runs it or
in which order), calls the ClientApp, and serializes the reply and the updated context.
Exceptions become Flower error replies, as in Flower's own engine.

Actors are long-lived: each keeps the ClientApp, its data and its caches loaded across
rounds, and takes a batch of tasks per call, so per-call overhead is paid once per batch.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

__all__ = ["LocalExecutor", "RayExecutor", "Task", "TaskResult", "execute_task"]


@dataclass
class Task:
    """One instruction for one node: serialized message and context, and its seed."""

    node_id: int
    message: bytes
    context: bytes
    seed: int


@dataclass
class TaskResult:
    """A reply (serialized), the node's updated context, and the host seconds it took."""

    node_id: int
    reply: bytes
    context: bytes
    host_s: float


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.default_generator.manual_seed(seed)  # CPU stream; torch.manual_seed is 250x slower


def serialize_message(msg: Message) -> bytes:
    """A message's bytes on the wire (Flower's protobuf form)."""
    return bytes(message_to_proto(msg).SerializeToString())


def deserialize_message(data: bytes) -> Message:
    """Invert :func:`serialize_message`."""
    proto = ProtoMessage()
    proto.ParseFromString(data)
    return message_from_proto(proto)


def serialize_context(ctx: Context) -> bytes:
    """A node's ``Context`` as bytes (its ``state`` travels with it between workers)."""
    return bytes(context_to_proto(ctx).SerializeToString())


def deserialize_context(data: bytes) -> Context:
    """Invert :func:`serialize_context`."""
    proto = ProtoContext()
    proto.ParseFromString(data)
    return context_from_proto(proto)


def execute_task(
    client_app: ClientApp | Callable[..., Any],
    task: Task,
    count_macs: bool = False,
    faults: Any = None,
) -> TaskResult:
    """Run one task through the ClientApp; never raises for the app's own failures.

    With ``count_macs`` the app runs under ``clients.mods.device_cost_mod``, which reports
    deterministic device compute times for apps that report none. ``faults`` (a
    ``sim.faults.FaultSpec``) injects this task's fault, if it drew one.
    """
    msg = deserialize_message(task.message)
    ctx = deserialize_context(task.context)
    # The device's copy carries its own (wall) clock; the engine restamps replies with
    # emulated instants on the way back.
    msg.metadata.created_at = time.time()
    _seed_everything(task.seed)
    t0 = time.perf_counter()
    try:
        app: Callable[[Message, Context], Message] = client_app
        if count_macs:
            from clients.mods import device_cost_mod

            def app(m: Message, c: Context) -> Message:
                return device_cost_mod(m, c, client_app)

        if faults is not None:
            from sim.faults import apply_faults

            reply = apply_faults(faults, task.seed, msg, ctx, app)
        else:
            reply = app(msg, ctx)
        if not isinstance(reply, Message):
            raise TypeError(f"ClientApp returned {type(reply).__name__}, expected a Message")
    except Exception as exc:  # the app's failure is the node's error reply
        reason = f"{type(exc).__name__}: {exc}"
        if os.environ.get("TINYFLEET_TRACEBACKS"):
            reason += "\n" + traceback.format_exc()
        reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
    host_s = time.perf_counter() - t0
    return TaskResult(task.node_id, serialize_message(reply), serialize_context(ctx), host_s)


class LocalExecutor:
    """Run tasks one after the other in the calling process (deterministic, no start-up)."""

    def __init__(
        self, client_app: ClientApp, count_macs: bool = False, faults: Any = None
    ) -> None:
        self.client_app = client_app
        self.count_macs = count_macs
        self.faults = faults
        self.num_workers = 1
        self.replaced = 0

    def run(self, tasks: Sequence[Task]) -> list[TaskResult]:
        """Execute ``tasks`` and return their results in the same order."""
        return [execute_task(self.client_app, t, self.count_macs, self.faults) for t in tasks]

    def shutdown(self) -> None:
        """Nothing to release."""


class _Worker:
    """The body of a Ray actor: one ClientApp kept loaded across calls."""

    def __init__(
        self,
        client_app: ClientApp,
        threads: int,
        env: dict[str, str],
        count_macs: bool,
        faults: Any,
    ) -> None:
        os.environ.update(env)
        os.environ["TINYFLEET_IN_ACTOR"] = "1"
        torch.set_num_threads(threads)
        self.client_app = client_app
        self.count_macs = count_macs
        self.faults = faults

    def run(self, tasks: list[Task]) -> list[TaskResult]:
        return [execute_task(self.client_app, t, self.count_macs, self.faults) for t in tasks]

    def ping(self) -> int:
        return os.getpid()


class RayExecutor:
    """Run tasks in a pool of long-lived Ray actors, several tasks per actor call.

    Parameters
    ----------
    client_app : ClientApp
        Shipped to each actor once (by Ray's serializer).
    num_actors : int
        Pool size; defaults to the CPUs Ray sees.
    address : str, optional
        A Ray cluster to join (``ray start --head`` elsewhere); ``None`` starts a local one.
    runtime_env : dict, optional
        Ray's runtime environment (e.g. ``working_dir``) so that other machines receive
        the project's code without a shared file system.
    threads_per_actor : int
        Torch threads per actor (1 keeps results independent of the pool's size).
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_actors: int | None = None,
        *,
        address: str | None = None,
        runtime_env: dict[str, Any] | None = None,
        threads_per_actor: int = 1,
        batch_size: int = 0,
        count_macs: bool = False,
        faults: Any = None,
    ) -> None:
        import ray

        self._ray = ray
        self._owns_ray = False
        if not ray.is_initialized():
            ray.init(
                # "local" always starts a fresh local Ray: without an address, ray.init
                # would join whatever cluster `ray start` left in /tmp/ray on this host.
                address=address or "local",
                runtime_env=runtime_env,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
                ignore_reinit_error=True,
            )
            self._owns_ray = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.num_workers = max(1, num_actors or cpus)
        self.batch_size = batch_size
        env = {k: v for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")}
        remote = ray.remote(num_cpus=min(1, cpus / self.num_workers))(_Worker)
        self._client_app = client_app
        self._remote = remote
        self._env = env
        self._threads = threads_per_actor
        self.count_macs = count_macs
        self.faults = faults
        self.actors = [self._new_actor() for _ in range(self.num_workers)]
        ray.get([a.ping.remote() for a in self.actors])
        self.replaced = 0

    def _new_actor(self) -> Any:
        return self._remote.remote(self._client_app, self._threads, self._env,
                                   self.count_macs, self.faults)

    def _chunks(self, tasks: Sequence[Task]) -> list[list[Task]]:
        size = self.batch_size or max(1, -(-len(tasks) // (2 * self.num_workers)))
        return [list(tasks[i : i + size]) for i in range(0, len(tasks), size)]

    def run(self, tasks: Sequence[Task]) -> list[TaskResult]:
        """Execute ``tasks`` on the pool; results come back in the order of ``tasks``.

        Batches go to whichever actor is free. An actor that dies mid-batch (its worker
        process killed, say) is replaced and its batch runs again on the new one.
        """
        ray = self._ray
        chunks = self._chunks(tasks)
        results: dict[int, list[TaskResult]] = {}
        pending = deque(range(len(chunks)))
        free = list(range(self.num_workers))
        inflight: dict[Any, tuple[int, int]] = {}
        while pending or inflight:
            while free and pending:
                a, c = free.pop(), pending.popleft()
                inflight[self.actors[a].run.remote(chunks[c])] = (a, c)
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                a, c = inflight.pop(ref)
                try:
                    results[c] = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                    self.actors[a] = self._new_actor()
                    self.replaced += 1
                    pending.append(c)
                free.append(a)
        return [r for c in range(len(chunks)) for r in results[c]]

    def shutdown(self) -> None:
        """Release the actors (and Ray itself if this executor started it)."""
        for a in self.actors:
            self._ray.kill(a)
        self.actors = []
        if self._owns_ray:
            self._ray.shutdown()
