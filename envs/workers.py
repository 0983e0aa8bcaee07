"""Step games in process or in a small pool of worker processes.

Each worker is a fresh ``python`` process (``subprocess``, not ``multiprocessing``): that way it
never re-imports the parent's ``__main__`` (a trainer script importing torch), so workers
stay torch-free. The worker rebuilds the suite from (name, seed, options) with
``sdar_envs.build_suite`` and holds the games of env indices ``i`` with ``i % N == rank``.
Messages are length-prefixed pickles over two pipes; the worker's stdout is redirected to
stderr so chatty engines (TextWorld) cannot corrupt the channel.
"""
from __future__ import annotations

import logging
import os
import pickle
import struct
import subprocess
import sys
import traceback
import weakref
from dataclasses import dataclass
from typing import Any, BinaryIO

log = logging.getLogger("sdar_envs.workers")
_HEADER = struct.Struct(">Q")


@dataclass(frozen=True)
class GameMeta:
    """What the main process needs to know about a game that may live in a worker."""

    task_id: str
    task_type: str
    task_text: str
    max_steps: int


def _meta(game: Any) -> GameMeta:
    return GameMeta(str(game.task_id), str(game.task_type), str(game.task_text), int(game.max_steps))


class InProcessRunner:
    """Games held in this process; the reference behaviour for ``WorkerPool``."""

    def __init__(self, suite: Any) -> None:
        self.suite = suite
        self.games: list[Any] = []

    def load(self, task_ids: list[str]) -> list[GameMeta]:
        self.games = [self.suite.make_game(t) for t in task_ids]
        return [_meta(g) for g in self.games]

    def reset_all(self) -> list[tuple[str, dict]]:
        return [g.reset() for g in self.games]

    def step(self, actions: dict[int, str]) -> dict[int, tuple[str, float, bool, dict]]:
        return {i: self.games[i].step(a) for i, a in actions.items()}

    def expert(self, indices: list[int]) -> list[str]:
        return [self.games[i].expert_action() for i in indices]

    def close(self) -> None:
        self.games = []


# ---------------------------------------------------------------- wire format
def _send(stream: BinaryIO, obj: object) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: BinaryIO) -> object:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("worker channel closed")
    (size,) = _HEADER.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("worker channel closed mid-message")
    return pickle.loads(data)


class WorkerPool:
    """``num_workers`` subprocesses, each holding a share of the batch's games."""

    def __init__(self, name: str, seed: int, options: dict, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers={num_workers!r} is not valid for a pool; use >= 1")
        self.name, self.n = name, num_workers
        self._procs: list[subprocess.Popen] = []
        self._chans: list[tuple[BinaryIO, BinaryIO]] = []
        self._num_envs = 0
        self.torch_loaded: list[bool] = []
        # finalize runs on close(), on garbage collection and at interpreter exit (atexit).
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._chans)
        try:
            for rank in range(num_workers):
                self._spawn(rank, seed, options)
            hellos = self._collect(list(range(num_workers)))
        except BaseException:
            self._finalizer()
            raise
        self.torch_loaded = [bool(h["torch_loaded"]) for h in hellos]
        log.info("started %d %s workers (pids %s)", num_workers, name, [p.pid for p in self._procs])

    def _spawn(self, rank: int, seed: int, options: dict) -> None:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        cmd = [sys.executable, "-c", "from sdar_envs.workers import serve; serve()",
               str(to_child_r), str(from_child_w)]
        proc = subprocess.Popen(cmd, pass_fds=(to_child_r, from_child_w), env=env,
                                stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno()
                                if _has_fileno(sys.stderr) else None)
        os.close(to_child_r)
        os.close(from_child_w)
        chan = (os.fdopen(to_child_w, "wb"), os.fdopen(from_child_r, "rb"))
        self._procs.append(proc)
        self._chans.append(chan)
        _send(chan[0], ("init", self.name, seed, options))

    def _collect(self, ranks: list[int]) -> list[Any]:
        """One reply per rank; every reply is read before raising, so channels stay in sync."""
        out, errors = [], []
        for r in ranks:
            try:
                status, payload = _recv(self._chans[r][1])
            except EOFError:
                code = self._procs[r].poll()
                errors.append(f"{self.name} worker {r} died (exit code {code}); see its stderr")
                continue
            if status == "error":
                errors.append(f"{self.name} worker {r} failed:\n{payload}")
            out.append(payload)
        if errors:
            raise RuntimeError("\n".join(errors))
        return out

    def _run(self, per_worker: dict[int, list[tuple]]) -> dict[int, Any]:
        """Send each worker its command list, then gather; returns results by env index."""
        ranks = [r for r, cmds in per_worker.items() if cmds]
        for r in ranks:
            _send(self._chans[r][0], ("batch", per_worker[r]))
        results: dict[int, Any] = {}
        for r, payload in zip(ranks, self._collect(ranks)):
            results.update(payload)
        return results

    def _split(self, items: dict[int, Any]) -> dict[int, list[tuple]]:
        per: dict[int, list[tuple]] = {r: [] for r in range(self.n)}
        for i, arg in items.items():
            per[i % self.n].append((i, arg))
        return per

    def load(self, task_ids: list[str]) -> list[GameMeta]:
        self._num_envs = len(task_ids)
        per = self._split(dict(enumerate(task_ids)))
        res = self._run({r: [("load", i, t) for i, t in cmds] or [("clear", -1, None)]
                         for r, cmds in per.items()})
        return [res[i] for i in range(len(task_ids))]

    def reset_all(self) -> list[tuple[str, dict]]:
        per = self._split({i: None for i in range(self._num_envs)})
        res = self._run({r: [("reset", i, None) for i, _ in c] for r, c in per.items()})
        return [res[i] for i in range(self._num_envs)]

    def step(self, actions: dict[int, str]) -> dict[int, tuple[str, float, bool, dict]]:
        per = self._split(actions)
        return self._run({r: [("step", i, a) for i, a in c] for r, c in per.items()})

    def expert(self, indices: list[int]) -> list[str]:
        per = self._split({i: None for i in indices})
        res = self._run({r: [("expert", i, None) for i, _ in c] for r, c in per.items()})
        return [res[i] for i in indices]

    def close(self) -> None:
        self._finalizer()


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
        return True
    except (AttributeError, OSError, ValueError):
        return False


def _shutdown(procs: list[subprocess.Popen], chans: list[tuple[BinaryIO, BinaryIO]]) -> None:
    for proc, (w, r) in zip(procs, chans):
        try:
            _send(w, ("close",))
        except (OSError, ValueError):
            pass
        for f in (w, r):
            try:
                f.close()
            except OSError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def make_runner(name: str, suite: Any, seed: int, options: dict,
                num_workers: int) -> InProcessRunner | WorkerPool:
    """In-process runner for ``num_workers == 0``, else a ``WorkerPool``."""
    if num_workers == 0:
        return InProcessRunner(suite)
    return WorkerPool(name, seed, options, num_workers)


# ---------------------------------------------------------------- worker side
def _handle(games: dict[int, Any], suite: Any, cmd: str, i: int, arg: Any) -> Any:
    if cmd == "clear":
        games.clear()
        return None
    if cmd == "load":
        games[i] = suite.make_game(arg)
        return _meta(games[i])
    if cmd == "reset":
        return games[i].reset()
    if cmd == "step":
        return games[i].step(arg)
    if cmd == "expert":
        return games[i].expert_action()
    raise ValueError(f"unknown worker command {cmd!r}")


def serve() -> None:
    """Worker main loop: ``python -c 'from sdar_envs.workers import serve; serve()' RFD WFD``."""
    rin, wout = os.fdopen(int(sys.argv[1]), "rb"), os.fdopen(int(sys.argv[2]), "wb")
    msg = _recv(rin)
    try:
        import sdar_envs
        _, name, seed, options = msg
        suite = sdar_envs.build_suite(name, seed=seed, **options)
        _send(wout, ("ok", {"torch_loaded": "torch" in sys.modules, "pid": os.getpid()}))
    except Exception:
        _send(wout, ("error", traceback.format_exc()))
        return
    games: dict[int, Any] = {}
    while True:
        try:
            msg = _recv(rin)
        except EOFError:
            return
        if msg[0] == "close":
            return
        try:
            if any(cmd == "load" for cmd, _, _ in msg[1]):
                games.clear()
            out = {i: _handle(games, suite, cmd, i, arg) for cmd, i, arg in msg[1] if cmd != "clear"}
            if any(cmd == "clear" for cmd, _, _ in msg[1]):
                games.clear()
            _send(wout, ("ok", out))
        except Exception:
            _send(wout, ("error", traceback.format_exc()))
