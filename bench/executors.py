"""Where the runs of a matrix execute: this machine (a process pool) or a Ray cluster.

Both take a top-level function `fn(ctx, item)` and a list of items (picklable: `bench.protocol`'s context and
run or study specs) and yield `(item, result)` as runs finish. No
scheduling of our own: the local executor is `concurrent.futures.ProcessPoolExecutor`, the Ray executor is Ray tasks
asking for one GPU each on CUDA machines.
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from typing import Any

from bench.errors import BadInput

log = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


class LocalExecutor:
    """`workers == 1`: runs in this process (epoch bars shown). More: a spawn process pool, one GPU per worker."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise BadInput(f"--workers {workers}: must be at least 1")
        self.workers = int(workers)

    def map(
        self, fn: Callable[..., Any], ctx: Any, items: list[Any], progress: Any = False
    ) -> Iterator[tuple[Any, Any]]:
        if not items:
            return
        if self.workers == 1 or len(items) == 1:
            for item in items:
                yield item, fn(ctx, item, progress=progress)
            return
        mp = multiprocessing.get_context("spawn")
        gpus = _gpu_count()
        queue = mp.Queue()
        for k in range(self.workers):
            queue.put(str(k % gpus) if gpus else None)
        with cf.ProcessPoolExecutor(
            max_workers=min(self.workers, len(items)),
            mp_context=mp,
            initializer=_init_worker,
            initargs=(queue,),
        ) as pool:
            futures = {pool.submit(fn, ctx, item): item for item in items}
            try:
                for fut in cf.as_completed(futures):
                    yield futures[fut], fut.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    def shutdown(self) -> None:
        pass


def _init_worker(queue: Any) -> None:
    gpu = queue.get()
    if gpu is not None:
        # Set before CUDA initialises in this process: the worker then sees exactly one GPU.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu


class RayExecutor:
    """Each item becomes a Ray task (`num_gpus=1` where the cluster has GPUs). `address=None` starts a local Ray."""

    def __init__(self, workers: int = 1, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise BadInput(
                "--executor ray: Ray is not installed; install the extra: pip install 'medsynbench[ray]'"
            ) from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False}
            if address:
                kwargs["address"] = address
            else:
                kwargs["num_cpus"] = max(1, int(workers))
                kwargs["include_dashboard"] = False
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                raise BadInput(f"--ray-address {address!r}: cannot connect to a Ray cluster: {e}") from e
            self.started = True
        self.num_gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0

    def map(
        self, fn: Callable[..., Any], ctx: Any, items: list[Any], progress: Any = False
    ) -> Iterator[tuple[Any, Any]]:
        if not items:
            return
        ray = self.ray
        remote = ray.remote(num_gpus=self.num_gpus, num_cpus=1, max_retries=0)(fn)
        ctx_ref = ray.put(ctx)
        refs = {remote.remote(ctx_ref, item): item for item in items}
        try:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                for ref in ready:
                    item = refs.pop(ref)
                    yield item, ray.get(ref)
        except BaseException:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def shutdown(self) -> None:
        if self.started:
            self.ray.shutdown()
            self.started = False


def check_executor(kind: str, workers: int = 1, ray_address: str | None = None) -> None:
    """Reject impossible executor settings before anything is written."""
    if kind not in EXECUTORS:
        raise BadInput(f"--executor {kind!r}: expected one of {list(EXECUTORS)}")
    if workers < 1:
        raise BadInput(f"--workers {workers}: must be at least 1")
    if ray_address and kind != "ray":
        raise BadInput("--ray-address needs --executor ray")
    if kind == "ray" and importlib.util.find_spec("ray") is None:
        raise BadInput(
            "--executor ray: Ray is not installed; install the extra: pip install 'medsynbench[ray]'"
        )


def make_executor(kind: str, workers: int = 1, ray_address: str | None = None) -> LocalExecutor | RayExecutor:
    check_executor(kind, workers, ray_address)
    if kind == "local":
        return LocalExecutor(workers)
    if kind == "ray":
        return RayExecutor(workers, ray_address)
    raise BadInput(f"--executor {kind!r}: expected one of {list(EXECUTORS)}")
