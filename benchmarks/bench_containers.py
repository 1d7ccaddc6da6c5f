"""Benchmark: preloading a 200 MB container image in a local build, against `docker pull` + `docker save`.

Run (as root): .venv/bin/python benchmarks/bench_containers.py [-repeat N]

The image `big:1` is a busybox layer and a 200 MB layer of incompressible bytes (fixed seed), pushed
to Debian's docker-registry on 127.0.0.1 (`tests.registry`). The source is `sample-image
-with-containers` (this machine's docker.io and containerd in ROOT-A). Measured, in one run:

- the build: start-image-build, run-script of `docker pull localhost:PORT/big:1` (the image's own
  dockerd, started on first use), finish-image-build -allow-host-loopback to a raw output; the wall
  time of finish-image-build and of the three steps together;
- the stock path, for scale: this machine's dockerd (`tests.registry.ScratchDockerd`, host network,
  a fresh data root) doing `docker pull` of the same image and `docker save -o FILE`;
- the output's allocated bytes (st_blocks * 512) minus the source's, against the image's size
  (`docker image inspect` .Size of the stock dockerd): the output should grow by the image, no more
  (also shown against the output of the no-container build below, as the sparse copy of the source
  drops the source's allocated zero blocks);
- the same build with a script that uses no container (`-containers=auto`, the default, and
  `-containers=off`): the daemons are started on first use only, so an unused runtime costs nothing.

Both daemons must agree on the image: the tag in the output's
/var_overlay/lib/docker/image/overlay2/repositories.json (read with debugfs) names the image id that
the stock dockerd reports. Targets: the output grows by at most 1.25x the image's size; the
no-container build starts no daemon and takes at most 1 s (or 25%) more than with -containers=off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.registry

from tests import registry

from cos_customizer.disk import ext, gpt

BIG_BYTES = 200 * 10**6
SEED = 20261127
GROWTH_TARGET = 1.25
IDLE_SLACK_SECONDS, IDLE_SLACK_RATIO = 1.0, 1.25
STATE = 1
SECTOR = 512
REPOSITORIES = "/var_overlay/lib/docker/image/overlay2/repositories.json"
PLAIN = "echo plain > /var/lib/plain\n"


def cli(env: dict[str, str], *argv: str | Path) -> str:
    result = subprocess.run([sys.executable, "-m", "cos_customizer", *map(str, argv)], env=env, capture_output=True,
                            text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"cos-customizer {argv[0]} failed:\n{(result.stdout + result.stderr)[-3000:]}")
    return result.stdout + result.stderr


def allocated(path: Path) -> int:
    return path.stat().st_blocks * SECTOR


@dataclass
class Build:
    total: float
    finish: float
    growth: int
    log: str


def build(work: Path, source: Path, script: str, *flags: str) -> tuple[Build, Path]:
    """start-image-build, run-script and finish-image-build (raw output) in a fresh workspace under `work`."""
    work.mkdir(parents=True)
    (work / "ctx").mkdir()
    (work / "ctx/preload.sh").write_text(script)
    output = work / "out.raw"
    env = {**os.environ, "HOME": str(work), "COS_CUSTOMIZER_WORKDIR": str(work / "ws")}
    began = time.perf_counter()
    cli(env, "start-image-build", f"-build-context={work / 'ctx'}", f"-image-file={source}")
    cli(env, "run-script", "-script=preload.sh")
    finish_began = time.perf_counter()
    log = cli(env, "finish-image-build", f"-output={output}", *flags)
    ended = time.perf_counter()
    return Build(ended - began, ended - finish_began, allocated(output) - allocated(source), log), output


def preloaded(output: Path) -> dict[str, str]:
    """The output's dockerd tags and their image ids, as debugfs reads repositories.json from its STATE."""
    offset = gpt.read_table(output).partition(STATE).first * SECTOR
    text = subprocess.run(["debugfs", "-R", f"cat {REPOSITORIES}", ext.device(output, offset)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    tags: dict[str, str] = {}
    for refs in json.loads(text)["Repositories"].values():
        tags.update({ref: image for ref, image in refs.items() if "@" not in ref})
    return tags


def stock(work: Path, reference: str) -> tuple[float, str, int, int]:
    """`docker pull` + `docker save -o` with this machine's dockerd in a fresh data root: seconds, image
    id, image size (inspect .Size) and the saved archive's size."""
    with registry.ScratchDockerd(work / "dockerd", host_network=True) as dockerd:
        began = time.perf_counter()
        dockerd.docker("pull", "-q", reference)
        dockerd.docker("save", "-o", work / "big.tar", reference)
        seconds = time.perf_counter() - began
        image_id, size = dockerd.docker("image", "inspect", "--format", "{{.Id}} {{.Size}}", reference).stdout.split()
    saved = (work / "big.tar").stat().st_size
    (work / "big.tar").unlink()
    return seconds, image_id, int(size), saved


def one_run(work: Path, source: Path, reference: str) -> dict[str, float]:
    pulled, output = build(work / "pull", source, f"set -e\ndocker pull {reference}\n", "-allow-host-loopback")
    if "starting the image's containerd and dockerd" not in pulled.log:
        raise SystemExit(f"the pull build started no daemon:\n{pulled.log[-3000:]}")
    tags = preloaded(output)
    output.unlink()
    idle, output = build(work / "idle", source, PLAIN)
    output.unlink()
    if "starting the image's" in idle.log:
        raise SystemExit(f"a build that uses no container started a daemon:\n{idle.log[-3000:]}")
    off, output = build(work / "off", source, PLAIN, "-containers=off")
    output.unlink()
    seconds, image_id, size, saved = stock(work / "stock", reference)
    if tags.get(reference) != image_id:
        raise SystemExit(f"the output's dockerd has {tags}, the stock dockerd {reference} -> {image_id}")
    return {"finish": pulled.finish, "total": pulled.total, "stock": seconds, "growth": pulled.growth, "size": size,
            "saved": saved, "idle_finish": idle.finish, "idle_total": idle.total, "idle_growth": idle.growth,
            "off_finish": off.finish, "off_total": off.total, "off_growth": off.growth}  # fmt: skip


def spread(values: list[float], unit: str = "s", digits: int = 1) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f} {unit}"
    return f"{statistics.median(values):.{digits}f} {unit} (runs: {', '.join(f'{v:.{digits}f}' for v in values)})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-repeat", type=int, default=1, help="runs of the whole comparison (default 1)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: loop devices, mounts and namespaces")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())  # fmt: skip
    memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    print(f"machine: {os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Linux {platform.release()}")
    with tempfile.TemporaryDirectory(prefix="bench-containers.", dir="/var/tmp") as tmp:
        work = Path(tmp)
        began = time.perf_counter()
        registry.busybox_layer(work / "busybox.tar")
        registry.random_layer(work / "big.tar", BIG_BYTES, SEED)
        layers = [work / "busybox.tar", work / "big.tar"]
        print(f"layers: {sum(p.stat().st_size for p in layers) / 1e6:.1f} MB ({time.perf_counter() - began:.1f} s)")
        began = time.perf_counter()
        source = work / "source.raw"
        subprocess.run([sys.executable, "-m", "cos_customizer", "sample-image", "-with-containers", str(source)],
                       check=True, capture_output=True)  # fmt: skip
        print(f"sample-image -with-containers: {time.perf_counter() - began:.1f} s, "
              f"{allocated(source) / 2**20:.1f} MiB allocated")  # fmt: skip
        with registry.Registry(work / "registry") as reg:
            began = time.perf_counter()
            registry.push_image(reg, "big", "1", layers)
            print(f"pushed big:1 to 127.0.0.1:{reg.port} ({time.perf_counter() - began:.1f} s)", flush=True)
            reference = f"localhost:{reg.port}/big:1"
            runs = []
            for index in range(args.repeat):
                runs.append(one_run(work / f"run{index}", source, reference))
                run = runs[-1]
                shown = (f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v / 1e6:.1f} MB" for k, v in run.items())
                print(f"  run {index + 1}: {', '.join(shown)}", flush=True)

    def column(key: str) -> list[float]:
        return [float(run[key]) for run in runs]

    size = runs[0]["size"]
    ratios = [run["growth"] / run["size"] for run in runs]
    # The sparse copy of the source drops its allocated zero blocks (about 33 MB of the sample), so the
    # image's own cost is also shown against the output of the no-container build of the same source.
    net = [(run["growth"] - run["idle_growth"]) / run["size"] for run in runs]
    print(f"image big:1: {size / 1e6:.1f} MB (docker image inspect .Size), `docker save` archive "
          f"{runs[0]['saved'] / 1e6:.1f} MB")  # fmt: skip
    print("preload (docker pull in the build, -allow-host-loopback, raw output):")
    print(f"  finish-image-build:   {spread(column('finish'))}")
    print(f"  whole build:          {spread(column('total'))} (start-image-build + run-script + finish)")
    print(f"  stock: docker pull + docker save -o, this machine's dockerd: {spread(column('stock'))}")
    print(f"  output allocated minus the source's: {spread([g / 1e6 for g in column('growth')], 'MB')}, "
          f"{spread(ratios, 'x', 2)} the image's size (target <= {GROWTH_TARGET}x)")  # fmt: skip
    net_mb = [(run["growth"] - run["idle_growth"]) / 1e6 for run in runs]
    print(f"  output allocated minus the no-container build's: {spread(net_mb, 'MB')}, "
          f"{spread(net, 'x', 2)} the image's size (target <= {GROWTH_TARGET}x)")  # fmt: skip
    print("no container used (echo > /var/lib/plain), same source:")
    for mode, key in (("auto", "idle"), ("off", "off")):
        grew = [g / 1e6 for g in column(f"{key}_growth")]
        print(f"  -containers={mode + ':':<5} finish {spread(column(f'{key}_finish'), digits=2)}, "
              f"whole {spread(column(f'{key}_total'), digits=2)}, grew {spread(grew, 'MB')}")  # fmt: skip
    idle, off = statistics.median(column("idle_finish")), statistics.median(column("off_finish"))
    met = True
    if max(ratios + net) > GROWTH_TARGET:
        print(f"MISSED: the output grew by more than {GROWTH_TARGET}x the image's size")
        met = False
    if idle > max(off + IDLE_SLACK_SECONDS, off * IDLE_SLACK_RATIO):
        print(f"MISSED: unused daemons cost {idle - off:.2f} s")
        met = False
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
