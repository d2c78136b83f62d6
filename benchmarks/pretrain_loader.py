"""Pre-training input pipeline: preprocessing speed, store size, DataLoader throughput and memory.

On a corpus made by benchmarks/make_corpus.py (renamed, randomly cropped and flipped copies of the
real volumes in shared/data: an I/O benchmark corpus, not a training corpus), measured one thing
at a time on this machine, never two at once:

1. `s3d preprocess CORPUS STORE --corpus --spacing 1 1 1 -j J` as a subprocess: volumes/s, skipped files;
2. bytes on disk of the blosc2 store vs the uncompressed float32 `.npz` per case that s3d wrote before;
3. time to the first batch, from DataLoader creation (s3d.data.loader.make_loader), per worker count;
4. patches/s at each --patches size and worker count (batch --batch-size, --batches batches after
   --warmup), over the volumes `s3d pretrain` would keep for that patch (s3d.data.curation.fov_reason);
5. peak memory of the main process and of each DataLoader worker (child processes, sampled from
   /proc in a thread while the loader runs), for store subsets of each --counts size (nested random
   subsets, symlinked into stores of their own so that nothing else of the big store is loaded);
6. the step rate of s3d's MAE objective (resenc-s, 64^3, batch 2, augmentation, SGD as
   s3d.train.loop) fed by the loader vs fed one batch replayed from memory: a ratio near 1 means the
   loader is not the bottleneck.

Every loader and training measurement runs in a fresh Python process (its peak RSS is its own);
the page cache is warm (the store was just written or read), which is the steady state of a long run.

Target (the S3D setting): a GPU step of ResEnc-L at batch 6 x 160^3 consumes ~12 patches/s on an
H100-class GPU (S3D paper: ~1.6 s/step on an A100), so the loader must deliver >= 4.5 patches/s of
160^3 per worker: 3x that need from 8 workers, the most s3d starts by default.

    python benchmarks/make_corpus.py /work/bench/corpus2000 --n 2000
    python benchmarks/pretrain_loader.py --corpus /work/bench/corpus2000 --store /work/bench/corpus2000-store
    python benchmarks/pretrain_loader.py --store /work/bench/corpus2000-store          # reuse the store
    python benchmarks/make_corpus.py /work/bench/c20 --n 20 --seed 1                   # smoke test:
    python benchmarks/pretrain_loader.py --corpus /work/bench/c20 --store /work/bench/c20-store --counts 10 20 \\
        --quick --results /work/bench/pretrain_loader_quick
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "pretrain_loader"
CORPUS_WHAT = "renamed/cropped/flipped copies of the real volumes in shared/data"
TARGET_PATCHES_PER_WORKER = 4.5  # of 160^3; see the module docstring
TARGET_LINE = ("Target: a GPU step of ResEnc-L at batch 6 x 160^3 consumes ~12 patches/s on an H100-class GPU "
               "(S3D paper, A100: ~1.6 s/step); the loader must deliver >= 4.5 patches/s of 160^3 per worker "
               "(3x that from 8 workers).")
CASE_SUFFIXES = (".b2nd", ".json", "_seg.b2nd", "_lossmask.b2nd", "_locations.npy")
STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
MIB = 2**20


# ----------------------------------------------------------------------------------------- memory
def _read_kb(path: str, keys: tuple[str, ...]) -> dict[str, int] | None:
    """{key: bytes} of `key:  N kB` lines in a /proc file; None when the process is gone."""
    try:
        with open(path) as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in keys:
            out[name] = int(rest.split()[0]) * 1024
    return out


def _children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (DataLoader workers are forked from the main thread,
    but a process can fork from any thread)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


class MemorySampler(threading.Thread):
    """Peak VmHWM/VmRSS/RssAnon/RssFile and Private_Dirty (memory only this process holds: what a
    forked worker adds beyond the pages it shares with the main process) of this process and its
    descendants, sampled every `interval` s. VmHWM is the kernel's own peak; the others are peaks of
    the samples. multiprocessing helpers (resource tracker, forkserver) are kept apart from workers."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.pid = os.getpid()
        self.peaks: dict[int, dict] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.interval)

    def sample(self) -> None:
        todo, seen = [self.pid], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo += _children(pid)
        for pid in seen:
            st = _read_kb(f"/proc/{pid}/status", STATUS_KEYS)
            if not st:
                continue
            rollup = _read_kb(f"/proc/{pid}/smaps_rollup", ("Private_Dirty",)) or {}
            rec = self.peaks.get(pid)
            if rec is None:
                cmd = _cmdline(pid)
                kind = "main" if pid == self.pid else (
                    "helper" if ("resource_tracker" in cmd or "forkserver" in cmd) else "worker")
                rec = self.peaks[pid] = {"kind": kind, **{k: 0 for k in (*STATUS_KEYS, "Private_Dirty")}}
            for k, v in (*st.items(), *rollup.items()):
                rec[k] = max(rec[k], v)

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()  # the main process's final VmHWM
        main = self.peaks[self.pid]
        workers = [r for r in self.peaks.values() if r["kind"] == "worker"]
        return {
            "main": {k: v for k, v in main.items() if k != "kind"},
            "workers": [{k: v for k, v in r.items() if k != "kind"} for r in workers],
            "worker_max": {k: max((r[k] for r in workers), default=0) for k in (*STATUS_KEYS, "Private_Dirty")},
        }


# ----------------------------------------------------------------------------------------- store
def _case_ids(store: Path) -> list[str]:
    """Finished cases of a store (CASE.json beside CASE.b2nd), sorted."""
    cases = store / "cases"
    return sorted(p.name[: -len(".json")] for p in cases.glob("*.json")
                  if not p.name.endswith(".skip.json") and ".tmp-" not in p.name
                  and (cases / (p.name[: -len(".json")] + ".b2nd")).is_file())


def subset_store(store: Path, count: int, work: Path, seed: int = 0) -> Path:
    """A store of `count` cases of `store` (symlinks; the first `count` of one seeded permutation, so
    smaller subsets are inside larger ones), or `store` itself when it has no more than `count`."""
    ids = _case_ids(store)
    if count >= len(ids):
        return store
    keep = sorted(ids[i] for i in np.random.default_rng(seed).permutation(len(ids))[:count])
    out = work / f"subset-{count}"
    if out.is_dir() and _case_ids(out) == keep:
        return out
    if out.exists():
        for p in (out / "cases").iterdir():
            p.unlink()
        (out / "cases").rmdir()
        for p in out.iterdir():
            p.unlink()
    (out / "cases").mkdir(parents=True)
    for name in ("plan.json", "store.json"):
        (out / name).symlink_to((store / name).resolve())
    for case_id in keep:
        for suffix in CASE_SUFFIXES:
            src = store / "cases" / f"{case_id}{suffix}"
            if src.exists():
                (out / "cases" / src.name).symlink_to(src.resolve())
    return out


def store_sizes(store: Path) -> dict:
    """Bytes of the store's arrays and of all its files, and what the previous s3d's uncompressed
    `np.savez` of each case's float32 data would take (data nbytes + the zip/npy overhead measured on
    a real np.savez of the same shape)."""
    import io

    # the zip + npy header bytes np.savez adds to one array (the npy header is padded to 64 bytes, so
    # it is the same for every 4-D float32 shape of up to ~40 characters)
    buf = io.BytesIO()
    np.savez(buf, data=np.zeros((1, 1, 1, 1), np.float32))
    overhead = buf.tell() - 4
    arrays = total = npz = cases = 0
    for p in (store / "cases").iterdir():
        size = p.stat().st_size
        total += size
        if p.name.endswith(".b2nd"):
            arrays += size
        if p.name.endswith(".json") and not p.name.endswith(".skip.json") and ".tmp-" not in p.name:
            props = json.loads(p.read_text())
            shape = (int(props.get("num_channels", 1)), *(int(s) for s in props["shape"]))
            npz += math.prod(shape) * 4 + overhead
            cases += 1
    total += sum(p.stat().st_size for p in store.iterdir() if p.is_file())
    return {"cases": cases, "b2nd_bytes": arrays, "store_bytes": total, "npz_equivalent_bytes": npz,
            "npz_over_b2nd": round(npz / arrays, 2) if arrays else None}


def _skipped(store: Path) -> int:
    return sum(len(json.loads(p.read_text()).get("skipped", [])) for p in store.glob("report*.json"))


def run_preprocess(corpus: Path, store: Path, jobs: int) -> dict:
    """Time `s3d preprocess CORPUS STORE --corpus --spacing 1 1 1 -j jobs` (startup and listing included)."""
    cmd = [sys.executable, "-m", "s3d", "preprocess", str(corpus), str(store), "--corpus", "--spacing", "1", "1",
           "1", "-j", str(jobs)]
    print("$ " + shlex.join(cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"s3d preprocess failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [ln for ln in proc.stdout.splitlines() if ln.strip()][-1:]
    written = len(_case_ids(store))
    return {"command": shlex.join(["s3d", *cmd[3:]]), "jobs": jobs, "wall_s": round(wall, 1),
            "volumes": written + _skipped(store), "written": written, "skipped": _skipped(store),
            "volumes_per_s": round((written + _skipped(store)) / wall, 2), "summary": last[0] if last else ""}


def _find_manifest(store: Path) -> Path | None:
    """make_corpus.py's manifest.json of the corpus a reused store was made from (found from the
    source path one case recorded), or None."""
    ids = _case_ids(store) if (store / "cases").is_dir() else []
    if not ids:
        return None
    source = json.loads((store / "cases" / f"{ids[0]}.json").read_text()).get("source")
    for parent in Path(source).parents if source else []:
        if (parent / "manifest.json").is_file():
            return parent / "manifest.json"
    return None


# ----------------------------------------------------------------------------------------- children
def _threads() -> dict:
    import torch

    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "torch_threads": torch.get_num_threads()}


def _cases_for_patch(store: Path, patch: tuple[int, int, int]) -> tuple[list, int]:
    """The cases `s3d pretrain` would feed for this patch (its fov filter) and how many it leaves out."""
    from s3d.data.curation import CurationConfig, fov_reason
    from s3d.data.preprocess import load_preprocessed

    _, cases = load_preprocessed(store)
    frac = CurationConfig().min_fov_fraction
    keep = [c for c in cases if fov_reason(c.shape, patch, frac) is None]
    return keep, len(cases) - len(keep)


def _dataset(cases: list, patch: tuple[int, int, int], batch: int, seed: int):  # noqa: ANN202 - PatchDataset
    from s3d.data.sampling import PatchDataset

    # the arguments s3d.train.pretrain.pretrain passes for MAE
    return PatchDataset(cases, patch, batch, oversample_foreground=0.0, seed=seed, rank=0, world_size=1,
                        channels_as_samples=True, with_valid_mask=True, start_step=0)


def child_loader(spec: dict) -> dict:
    """Time to first batch, patches/s and peak memory of one (store, patch, workers) DataLoader."""
    import torch

    from s3d.data.loader import make_loader

    device = torch.device(spec["device"])
    patch = tuple(spec["patch"])
    mem = MemorySampler()
    mem.start()
    t = time.perf_counter()
    cases, left_out = _cases_for_patch(Path(spec["store"]), patch)
    if not cases:
        mem.stop()
        return {"fed": 0, "left_out": left_out}
    dataset = _dataset(cases, patch, spec["batch"], spec["seed"])
    n_fed = len(cases)
    del cases  # as pretrain() does: the workers get the compact table only
    gc.collect()
    t_cases = time.perf_counter() - t

    def consume(b: dict) -> None:
        for v in b.values():
            if device.type == "cuda":  # what the training loop does with a batch
                v.to(device, non_blocking=True)
            else:
                # read one element per 4 KiB page, as a CPU training step would read them all: a worker's
                # batch arrives in shared memory and only counts in this process's RSS once touched
                v.reshape(-1)[:: max(1, 4096 // v.element_size())].sum()

    t = time.perf_counter()
    loader = make_loader(dataset, spec["workers"], device)
    it = iter(loader)
    consume(next(it))
    ttfb = time.perf_counter() - t
    for _ in range(spec["warmup"] - 1):
        consume(next(it))
    t = time.perf_counter()
    for _ in range(spec["batches"]):
        consume(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    memory = mem.stop()
    del it, loader
    rate = spec["batches"] * spec["batch"] / dt
    return {"fed": n_fed, "left_out": left_out, "load_cases_s": round(t_cases, 2), "ttfb_s": round(ttfb, 3),
            "patches_per_s": round(rate, 2),
            "patches_per_s_per_worker": round(rate / max(1, spec["workers"]), 2),
            "memory": memory, **_threads()}


def child_train(spec: dict) -> dict:
    """s/step of the MAE objective (as s3d.train.pretrain builds it) fed by the loader or by one
    batch replayed from memory; the step is s3d.train.loop's (autocast, SGD, gradient clipping)."""
    import torch

    from s3d.data.augment import Augmenter
    from s3d.data.loader import make_loader
    from s3d.device import amp_dtype
    from s3d.nn.masking import default_block_size, parse_mask_ratio
    from s3d.train.loop import TrainConfig
    from s3d.train.pretrain import MAEObjective, PretrainConfig, network_config

    device = torch.device(spec["device"])
    patch = tuple(spec["patch"])
    cfg = PretrainConfig(method="mae", arch=spec["arch"], patch_size=patch, batch_size=spec["batch"],
                         spacing=(1.0, 1.0, 1.0), amp=spec["amp"])
    net_cfg = network_config(cfg)
    torch.manual_seed(0)
    objective = MAEObjective(net_cfg, patch, parse_mask_ratio(cfg.mask_ratio), default_block_size(patch, net_cfg),
                             Augmenter.for_pretraining(patch) if cfg.augment else None).to(device)
    tc = TrainConfig(steps=1)
    params = [p for p in objective.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay, nesterov=tc.nesterov)
    dtype = amp_dtype(cfg.amp, device)
    cases, left_out = _cases_for_patch(Path(spec["store"]), patch)
    dataset = _dataset(cases, patch, spec["batch"], spec["seed"])
    n_fed = len(cases)
    del cases
    if spec["feed"] == "replay":
        one = {k: v.to(device) for k, v in dataset.batch(0).items()}
        batches = iter(lambda: one, None)
    else:
        batches = iter(make_loader(dataset, spec["workers"], device))

    def step() -> torch.Tensor:
        batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss, _ = objective(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        return loss.detach()

    objective.train()
    for _ in range(spec["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(spec["steps"]):
        loss = step()
    float(loss)  # waits for the last step on CUDA
    dt = time.perf_counter() - t
    return {"fed": n_fed, "left_out": left_out, "s_per_step": round(dt / spec["steps"], 3),
            "steps_per_s": round(spec["steps"] / dt, 3), "amp": str(dtype).replace("torch.", "") if dtype else "off",
            **_threads()}


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter (its own peak RSS, no workers left from before)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"measurement {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------- report
def _mib(b: int | float) -> str:
    return f"{b / MIB:.0f}"


def _gib(b: int | float) -> str:
    return f"{b / 2**30:.2f} GiB"


def _machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = (_read_kb("/proc/meminfo", ("MemTotal",)) or {}).get("MemTotal", 0)
    out = {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(mem / 2**30, 1),
           "python": platform.python_version(), "date": date.today().isoformat()}
    import torch

    out["torch"] = torch.__version__
    if device.startswith("cuda") and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


def markdown(res: dict) -> str:
    lines = [f"# Pre-training loader benchmark ({res['machine']['date']})", "",
             f"Command: `{res['command']}`", "",
             f"Corpus: {res['corpus']['what']}; {res['corpus'].get('files', '?')} files"
             + (f" (`{res['corpus']['command']}`)" if res["corpus"].get("command") else "") + ".", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {res['machine']['ram_gib']} GiB RAM"
             + (f", {res['machine']['gpu']}" if res["machine"].get("gpu") else "")
             + f"; Python {res['machine']['python']}, torch {res['machine']['torch']}, device {res['device']}.", "",
             f"Threads: OMP_NUM_THREADS={res['threads']['OMP_NUM_THREADS']}, torch threads in the main process "
             f"{res['threads']['torch_threads']}; each DataLoader worker 1 torch thread and 1 blosc2 thread "
             "(s3d.data.loader); page cache warm.", "", TARGET_LINE, ""]
    pp = res.get("preprocess")
    if pp:
        lines += ["## Preprocessing", "", "| volumes | written | skipped | -j | wall | volumes/s |",
                  "| --- | --- | --- | --- | --- | --- |",
                  f"| {pp['volumes']} | {pp['written']} | {pp['skipped']} | {pp['jobs']} | {pp['wall_s']} s | "
                  f"**{pp['volumes_per_s']}** |", "", f"`{pp['command']}`", ""]
    else:
        lines += ["## Preprocessing", "", f"not measured: reused the store {res['store']}", ""]
    sz = res["sizes"]
    lines += ["## Disk", "",
              "| cases | blosc2 arrays | whole store | old uncompressed .npz equivalent | npz / blosc2 |",
              "| --- | --- | --- | --- | --- |",
              f"| {sz['cases']} | {_gib(sz['b2nd_bytes'])} | {_gib(sz['store_bytes'])} | "
              f"{_gib(sz['npz_equivalent_bytes'])} | **{sz['npz_over_b2nd']}x** |", ""]
    lines += ["## DataLoader", "",
              f"Batch {res['batch']}, {res['warmup']} warm-up + {res['batches']} timed batches per row. `fed`: volumes "
              "`s3d pretrain` keeps for the patch (the others are smaller than it along >= 2 axes). Memory in MiB: "
              "VmHWM = peak RSS (a forked worker's includes pages shared with the main process); "
              "private = peak Private_Dirty, what the process alone adds.", "",
              "| volumes | fed | patch | workers | first batch | patches/s | per worker | target | main VmHWM | "
              "main private | worker VmHWM (max) | worker private (max) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["loader"]:
        m = r["memory"]
        target = ""
        if r["patch"] == 160 and r["workers"] > 0:
            target = "ok" if r["patches_per_s_per_worker"] >= TARGET_PATCHES_PER_WORKER else "**below**"
        w = m["worker_max"]
        worker_cols = f"{_mib(w['VmHWM'])} | {_mib(w['Private_Dirty'])}" if r["workers"] else "- | -"
        lines.append(f"| {r['count']} | {r['fed']} | {r['patch']}^3 | {r['workers']} | {r['ttfb_s']:.2f} s | "
                     f"{r['patches_per_s']:.1f} | {r['patches_per_s_per_worker']:.1f} | {target} | "
                     f"{_mib(m['main']['VmHWM'])} | {_mib(m['main']['Private_Dirty'])} | "
                     f"{worker_cols} |")
    counts = sorted({r["count"] for r in res["loader"]})
    if len(counts) >= 2:
        lo, hi = counts[0], counts[-1]
        lines += ["", f"Memory growth from {lo} to {hi} volumes (MiB, same patch and workers):", "",
                  "| patch | workers | main VmHWM | main private | worker VmHWM (max) | worker private (max) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        by = {(r["count"], r["patch"], r["workers"]): r["memory"] for r in res["loader"]}
        for (c, p, w), m in sorted(by.items()):
            if c != lo or (hi, p, w) not in by:
                continue
            m2 = by[(hi, p, w)]

            def d(a: dict, b: dict, k: str) -> str:
                return f"{round((b[k] - a[k]) / MIB):+d}"
            lines.append(f"| {p}^3 | {w} | {d(m['main'], m2['main'], 'VmHWM')} | "
                         f"{d(m['main'], m2['main'], 'Private_Dirty')} | "
                         + (f"{d(m['worker_max'], m2['worker_max'], 'VmHWM')} | "
                            f"{d(m['worker_max'], m2['worker_max'], 'Private_Dirty')} |" if w else "- | - |"))
    tr = res.get("train")
    if tr:
        replay = next((r for r in tr["runs"] if r["feed"] == "replay"), None)
        lines += ["", f"## MAE training step ({tr['arch']}, {tr['patch']}^3, batch {tr['batch']}, amp {tr['amp']}, "
                  f"{tr['warmup']} warm-up + {tr['steps']} timed steps, {tr['count']} volumes)", "",
                  "| fed by | workers | s/step | steps/s | vs replay |", "| --- | --- | --- | --- | --- |"]
        for r in tr["runs"]:
            ratio = f"{r['steps_per_s'] / replay['steps_per_s']:.2f}" if replay else ""
            lines.append(f"| {r['feed']} | {r.get('workers', '-')} | {r['s_per_step']:.3f} | {r['steps_per_s']:.3f} | "
                         f"{ratio} |")
        lines += ["", "On a CPU-only machine the loader's workers and the training step share the same cores, so a "
                  "ratio below 1 there measures contention as much as loading."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, help="image corpus (benchmarks/make_corpus.py output) to preprocess")
    ap.add_argument("--store", type=Path, help="the store: reused if it holds plan.json, else written from --corpus "
                                                "(default: CORPUS-store beside the corpus)")
    ap.add_argument("--work", type=Path, help="where the --counts subsets (symlinks) go (default: STORE-subsets)")
    ap.add_argument("--counts", type=int, nargs="+", default=[200, 2000], help="store sizes for the loader rows")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patches", type=int, nargs="+", default=[160, 64], help="cubic patch edges")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--batches", type=int, default=30, help="timed batches per loader row")
    ap.add_argument("--warmup", type=int, default=4, help="batches before timing (the first one is the TTFB)")
    ap.add_argument("--train-steps", type=int, default=8, help="timed MAE steps per feed (after 2 warm-up steps)")
    ap.add_argument("--train-patch", type=int, default=64)
    ap.add_argument("--arch", default="resenc-s")
    ap.add_argument("--amp", default="off", choices=["off", "auto", "bf16", "fp16"],
                    help="autocast of the MAE step (auto: bf16 on CUDA, off on CPU)")
    ap.add_argument("--no-train", action="store_true", help="skip measurement 6")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="`s3d preprocess -j`")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where batches go (pinned memory on cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 4 timed batches, 2 training steps")
    ap.add_argument("--results", type=Path, default=RESULTS, help="writes RESULTS.json and RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        spec = json.loads(args.child)
        out = child_loader(spec) if spec["kind"] == "loader" else child_train(spec)
        print("RESULT " + json.dumps(out), flush=True)
        return
    if args.quick:
        args.batches, args.warmup, args.train_steps = 4, 2, 2
    if args.store is None:
        if args.corpus is None:
            ap.error("give --corpus, --store or both")
        args.store = args.corpus.parent / f"{args.corpus.name}-store"
    work = args.work or args.store.parent / f"{args.store.name}-subsets"
    command = "python benchmarks/pretrain_loader.py " + shlex.join(sys.argv[1:])
    print(command, flush=True)

    res: dict = {"command": command, "device": args.device, "machine": _machine(args.device),
                 "threads": _threads(), "store": str(args.store), "batch": args.batch_size,
                 "batches": args.batches, "warmup": args.warmup, "target": TARGET_LINE}
    corpus_info: dict = {"what": CORPUS_WHAT}
    manifest = (args.corpus / "manifest.json") if args.corpus else _find_manifest(args.store)
    if manifest and manifest.is_file():
        m = json.loads(manifest.read_text())
        corpus_info.update(files=len(m.get("files", [])), command=m.get("command"), summary=m.get("summary"))
    res["corpus"] = corpus_info

    # 1. preprocessing (or reuse)
    if (args.store / "plan.json").is_file():
        print(f"reusing the store {args.store} (preprocessing not timed)")
        res["preprocess"] = None
    else:
        if args.corpus is None:
            ap.error(f"{args.store} is not a store (no plan.json) and no --corpus was given to write it")
        res["preprocess"] = run_preprocess(args.corpus, args.store, args.jobs)
        print(json.dumps(res["preprocess"]), flush=True)
    n_cases = len(_case_ids(args.store))
    if "files" not in corpus_info:
        corpus_info["files"] = n_cases

    # 2. disk
    res["sizes"] = store_sizes(args.store)
    print(json.dumps(res["sizes"]), flush=True)

    # 3-5. loader rows, one fresh process each, one at a time
    base = {"batch": args.batch_size, "batches": args.batches, "warmup": args.warmup, "seed": args.seed,
            "device": args.device}
    counts = sorted({min(c, n_cases) for c in args.counts})
    res["loader"] = []
    for count in counts:
        sub = subset_store(args.store, count, work, args.seed)
        for p in args.patches:
            for w in args.workers:
                spec = {**base, "kind": "loader", "store": str(sub), "patch": [p] * 3, "workers": w}
                r = run_child(spec)
                if not r.get("fed"):
                    print(f"{count} volumes, {p}^3: no volume holds the patch; row skipped")
                    continue
                row = {"count": count, "patch": p, "workers": w, **r}
                res["loader"].append(row)
                print(f"{count:5d} vol  {p:3d}^3  {w} workers: first batch {r['ttfb_s']:.2f} s, "
                      f"{r['patches_per_s']:.1f} patches/s, main peak {_mib(r['memory']['main']['VmHWM'])} MiB, "
                      f"worker peak {_mib(r['memory']['worker_max']['VmHWM'])} MiB", flush=True)

    # 6. training step fed by the loader vs replayed
    if not args.no_train:
        count = counts[-1]
        sub = subset_store(args.store, count, work, args.seed)
        tspec = {**base, "kind": "train", "store": str(sub), "patch": [args.train_patch] * 3, "arch": args.arch,
                 "amp": args.amp, "warmup": 2, "steps": args.train_steps}
        runs = []
        for feed, w in [("replay", 0), *(("loader", w) for w in args.workers)]:
            r = run_child({**tspec, "feed": feed, "workers": w})
            runs.append({"feed": feed, **({"workers": w} if feed == "loader" else {}), **r})
            print(f"MAE step fed by {feed}{f' ({w} workers)' if feed == 'loader' else ''}: "
                  f"{r['s_per_step']:.3f} s/step", flush=True)
        res["train"] = {"arch": args.arch, "patch": args.train_patch, "batch": args.batch_size, "count": count,
                        "warmup": 2, "steps": args.train_steps, "amp": runs[0]["amp"], "runs": runs}

    md = markdown(res)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.results.with_suffix(".md").write_text(md)
    print()
    print(md)
    print(f"wrote {args.results.with_suffix('.json')} and {args.results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
