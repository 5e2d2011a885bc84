"""Build, on a connected machine, the wheels an air-gapped GPU box needs to run dpo_ray (and
bench/gpu_check.py).

The box is assumed to have Python 3.12 (``--python-version``), a CUDA build of torch, transformers and peft
(the "box" set: ``BOX``). This script downloads what the rest needs and the box lacks: Ray with its train and
data extras, DeepSpeed (built here as a py3-none-any wheel: it is published as a source distribution only),
datasets, pydantic, TRL (bench/gpu_check.py compares against it) and their dependencies, all at the versions
in constraints.txt. What the box set already brings is left out: the script resolves both sets with pip
(``--dry-run --report``, metadata only) against a stand-in torch wheel carrying the real torch's requirements
(this registry cannot resolve CUDA torch's nvidia-* packages), and keeps the difference.

Trimming (``trim_wheel``): Ray's manylinux wheel is ~79 MB, ~32 MB of it Java jars; pyarrow carries Flight,
S3, headers and Cython sources; pandas its test suite. The rules in ``TRIM`` drop what training never loads,
native binaries are stripped of their symbol tables (``strip --strip-unneeded``, when binutils is present),
and every wheel is re-packed with LZMA compression (a valid ZIP method; pip installs it through ``zipfile``).
Each re-packed wheel gets a fresh RECORD (sha256 + size of every file kept), so pip accepts it.

Verification (``--verify``): every wheel is installed with ``pip install --no-index --no-deps --target DIR``
(for the target platform: this is what the box runs). When this interpreter's Python version differs from
the target's, the same recipe is built for this interpreter too (``<out>-py3XX``: the same files kept,
stored without compression since it is never shipped; the wheels whose names match the target's, DeepSpeed's
among them, copied rather than built again) and that set is imported from ``PYTHONPATH=DIR`` in a subprocess:
ray, ray.train, ray.data, deepspeed, datasets, trl, a ``ray.init`` and a remote task, with the module files
checked to come from DIR.

Run it with the project's venv (DeepSpeed's build imports torch):

    .venv/bin/python scripts/wheelhouse.py [--out wheelhouse] [--python-version 3.12] [--verify]
"""

from __future__ import annotations

import argparse
import base64
import csv
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
BOX = ("torch", "transformers", "peft")
# what dpo_ray's runtime and bench/gpu_check.py need beyond the box (versions from constraints.txt where
# pinned) (pytest: gpu_check's first stage runs the GPU-marked tests; matplotlib is left out, ~20 MiB with its
# dependencies: without it a run writes no metrics.png, everything else is the same)
NEED = ("ray[train,data]", "deepspeed", "datasets", "pydantic", "trl==1.16.0", "PyYAML", "tqdm", "pyarrow",
        "tensorboardX", "pytest", "pytest-timeout")

# Per-distribution trimming: glob patterns (matched against the path inside the wheel) of files to drop.
TRIM: dict[str, tuple[str, ...]] = {
    "ray": (
        "ray/jars/*",                       # Java workers: ~31 MB compressed
        "ray/dashboard/client/build/*",     # the dashboard's web UI (a head started with include_dashboard
                                            # still runs; it serves no pages)
        "*.js.map", "*.css.map",            # source maps
        "ray/rllib/*", "ray/serve/*", "ray/llm/*",  # libraries training never imports
        "ray/tests/*", "*/tests/*",
    ),
    "pyarrow": (
        "pyarrow/include/*", "pyarrow/src/*", "pyarrow/tests/*", "pyarrow/*.pyx", "pyarrow/*.pxd",
        "pyarrow/*.pxi", "pyarrow/includes/*", "pyarrow/vendored/*.pxd",
        "pyarrow/libarrow_flight.so*", "pyarrow/libarrow_python_flight.so*", "pyarrow/_flight.*",
        "pyarrow/flight.py",                # Arrow Flight RPC
        "pyarrow/libarrow_s3.so*", "pyarrow/_s3fs.*",  # S3 filesystem (pyarrow.fs imports it optionally)
        "pyarrow/_azurefs.*", "pyarrow/_gcsfs.*", "pyarrow/_hdfs.*",  # likewise optional in pyarrow.fs
        "pyarrow/libarrow_python.so", "pyarrow/libarrow_python.so.*.*.*",  # link-time copies; the loader
                                                                           # uses libarrow_python.so.NNNN
        "pyarrow/libparquet.so", "pyarrow/libarrow.so",
    ),
    "pandas": ("pandas/tests/*", "pandas/conftest.py"),
    "deepspeed": ("deepspeed/ops/csrc/*/tests/*",),
}
ELF_SUFFIX = re.compile(r"(\.so(\.\d+)*$)|(/ray/core/src/ray/(gcs/gcs_server|raylet/raylet)$)")


# ------------------------------------------------------------------------------------------ wheel surgery

def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _dist_name(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def trim_wheel(src: Path, dst: Path, drop: tuple[str, ...] = (), strip: bool = False,
               compression: int = zipfile.ZIP_LZMA) -> dict:
    """Copy wheel ``src`` to ``dst`` without the files matching ``drop`` (globs on the archive path), native
    binaries stripped when ``strip``, re-compressed, with a RECORD listing exactly the files kept.
    Returns {"dropped": n_files, "dropped_bytes": uncompressed bytes, "stripped": n_files}."""
    stats = {"dropped": 0, "dropped_bytes": 0, "stripped": 0}
    with zipfile.ZipFile(src) as zin:
        names = [i for i in zin.infolist() if not i.is_dir()]
        record = next((i.filename for i in names if re.fullmatch(r"[^/]+\.dist-info/RECORD", i.filename)),
                      None)
        if record is None:
            raise ValueError(f"{src.name}: no *.dist-info/RECORD: not a wheel")
        rows = []
        tmp = dst.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", compression=compression) as zout:
            for info in names:
                name = info.filename
                if name == record:
                    continue
                if any(fnmatch.fnmatch(name, pat) for pat in drop):
                    stats["dropped"] += 1
                    stats["dropped_bytes"] += info.file_size
                    continue
                data = zin.read(info)
                if strip and ELF_SUFFIX.search("/" + name) and data[:4] == b"\x7fELF":
                    data, did = _strip(data)
                    stats["stripped"] += did
                out = zipfile.ZipInfo(name, date_time=info.date_time)
                out.external_attr = info.external_attr  # keep the executable bits (raylet, gcs_server)
                out.compress_type = compression
                zout.writestr(out, data)
                rows.append((name, _record_hash(data), str(len(data))))
            rows.append((record, "", ""))
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(rows)
            rec = zipfile.ZipInfo(record, date_time=(2020, 1, 1, 0, 0, 0))
            rec.external_attr = 0o644 << 16
            rec.compress_type = compression
            zout.writestr(rec, buf.getvalue())
    tmp.replace(dst)
    return stats


def _strip(data: bytes) -> tuple[bytes, int]:
    exe = shutil.which("strip")
    if exe is None:
        return data, 0
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        r = subprocess.run([exe, "--strip-unneeded", f.name], capture_output=True)
        return (Path(f.name).read_bytes(), 1) if r.returncode == 0 else (data, 0)
    finally:
        os.unlink(f.name)


# ------------------------------------------------------------------------------------------ resolution

def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, ver = line.split("==")
            pins[name.strip().lower()] = ver.strip()
    return pins


def _pinned(req: str, pins: dict[str, str]) -> str:
    if "==" in req:
        return req
    base = req.split("[")[0].lower()
    return f"{req}=={pins[base]}" if base in pins else req


def stub_torch(folder: Path, version: str) -> str:
    """A stand-in torch wheel (version ``V+box``) whose requirements are the local torch's, less the CUDA
    runtime packages: the resolver then sees what torch brings without this registry resolving nvidia-*."""
    from importlib.metadata import distribution

    reqs = [r for r in (distribution("torch").requires or [])
            if not re.match(r"(nvidia|triton|cuda)", r, re.I)]
    ver = f"{version}+box"
    meta = ("Metadata-Version: 2.1\nName: torch\nVersion: " + ver + "\n"
            + "".join(f"Requires-Dist: {r}\n" for r in reqs))
    files = {f"torch-{ver}.dist-info/METADATA": meta.encode(),
             f"torch-{ver}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: wheelhouse\n"
                                             b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"torch-{ver}-py3-none-any.whl", "w") as z:
        rows = []
        for name, data in files.items():
            z.writestr(name, data)
            rows.append(f"{name},{_record_hash(data)},{len(data)}")
        z.writestr(f"torch-{ver}.dist-info/RECORD",
                   "\n".join(rows + [f"torch-{ver}.dist-info/RECORD,,"]) + "\n")
    return ver


def _target_flags(pyver: str) -> list[str]:
    flags = ["--python-version", pyver, "--only-binary=:all:"]
    for p in PLATFORMS:
        flags += ["--platform", p]
    return flags


def pip(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        err = "\n".join(ln for ln in r.stderr.splitlines() if "is ignored" not in ln)
        raise RuntimeError(f"pip {' '.join(args[:3])} ... failed:\n{err[-3000:]}")
    return r


def resolve(reqs: list[str], pyver: str, links: list[Path], work: Path, name: str) -> dict[str, str]:
    """{distribution name (normalised): version} pip would install for ``reqs`` on the target Python."""
    report = work / f"{name}.json"
    args = ["install", "--dry-run", "--ignore-installed", "--report", str(report), "--target",
            str(work / "t"), *_target_flags(pyver)]
    for d in links:
        args += ["--find-links", str(d)]
    pip(*args, *reqs)
    out = {}
    for item in json.loads(report.read_text())["install"]:
        out[re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower()] = item["metadata"]["version"]
    return out


def build_deepspeed(version: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DS_BUILD_OPS="0")  # ops JIT-compile on the box (its CUDA toolchain), as pip would
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(folder), f"deepspeed=={version}"], capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError("building the deepspeed wheel failed (needs torch in this "
                           f"interpreter):\n{r.stderr[-3000:]}")
    (wheel,) = folder.glob("deepspeed-*.whl")
    return wheel


def _trim_all(raw: Path, out: Path, compression: int, strip: bool, reuse: Path | None) -> list[dict]:
    """Every wheel of ``raw`` trimmed into ``out``, the largest first, one process per core (LZMA is one
    core's work per wheel). A wheel ``reuse`` (another build of the same recipe) already holds under the same
    file name is the same file (pure-Python and abi3 wheels serve every Python): copied, not trimmed again."""
    from concurrent.futures import ProcessPoolExecutor

    done = {}
    if reuse is not None and (reuse / "wheelhouse.json").exists():
        done = {r["wheel"]: r for r in json.loads((reuse / "wheelhouse.json").read_text())["wheels"]}
    wheels = sorted(raw.glob("*.whl"), key=lambda w: -w.stat().st_size)
    todo = [w for w in wheels if w.name not in done]
    with ProcessPoolExecutor(max_workers=max(1, min(len(todo), os.cpu_count() or 1))) as pool:
        jobs = {w.name: pool.submit(trim_wheel, w, out / w.name, TRIM.get(_dist_name(w), ()),
                                    strip=strip and _dist_name(w) in TRIM, compression=compression)
                for w in todo}
        stats = {name: job.result() for name, job in jobs.items()}
    rows = []
    for wheel in sorted(wheels):
        if wheel.name in done:
            shutil.copy(reuse / wheel.name, out / wheel.name)
            rows.append(done[wheel.name])
            continue
        rows.append({"wheel": wheel.name, "dist": _dist_name(wheel), "original_bytes": wheel.stat().st_size,
                     "bytes": (out / wheel.name).stat().st_size, **stats[wheel.name]})
    return rows


def build(out: Path, pyver: str, compression: int, strip: bool, log=print, reuse: Path | None = None
          ) -> list[dict]:
    pins = constraints()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        work = Path(tmp)
        ver = stub_torch(work / "stub", pins["torch"])
        # DeepSpeed's wheel is pure Python (py3-none-any): another build of the recipe already made it (copied
        # into the folder pip resolves from, as a fresh build would be)
        built = sorted(reuse.glob(f"deepspeed-{pins['deepspeed']}-*.whl")) if reuse is not None else []
        if built:
            (work / "ds").mkdir(parents=True)
            ds = Path(shutil.copy(built[0], work / "ds" / built[0].name))
        else:
            ds = build_deepspeed(pins["deepspeed"], work / "ds")
        links = [work / "stub", work / "ds"]
        box = [f"torch=={ver}"] + [_pinned(b, pins) for b in BOX[1:]]
        log(f"resolving for Python {pyver}: box = {' '.join(box)}")
        have = resolve(box, pyver, links, work, "box")
        # What the box has stays at the box's version (a constraint on the second resolution), so a package
        # the box already carries (e.g. pydantic, through transformers' dependencies) is not shipped again at
        # another patch level; what it lacks is pinned as in constraints.txt.
        keep = work / "box-constraints.txt"
        keep.write_text("".join(f"{n}=={v}\n" for n, v in have.items() if n != "torch"))
        need = [n if n.split("[")[0].split("=")[0].lower() in have else _pinned(n, pins) for n in NEED]
        want = resolve(box + need + ["-c", str(keep)], pyver, links, work, "all")
        missing = {n: v for n, v in want.items() if have.get(n) != v}
        log(f"{len(want)} distributions in all, {len(have)} on the box, {len(missing)} to ship")
        raw = work / "raw"
        raw.mkdir()
        shutil.copy(ds, raw)
        reqs = [f"{n}=={v}" for n, v in sorted(missing.items()) if n != "deepspeed"]
        pip("download", "--no-deps", "-d", str(raw), *_target_flags(pyver), *reqs)
        rows = _trim_all(raw, out, compression, strip, reuse)
    (out / "wheelhouse.json").write_text(json.dumps({"python": pyver, "platforms": PLATFORMS,
                                                     "box": list(BOX), "wheels": rows}, indent=1))
    return rows


def size_table(rows: list[dict]) -> str:
    mib = 2 ** 20
    lines = [f"{'wheel':<72} {'orig MiB':>9} {'MiB':>7} {'dropped':>8} {'stripped':>8}"]
    for r in sorted(rows, key=lambda r: -r["bytes"]):
        lines.append(f"{r['wheel'][:72]:<72} {r['original_bytes'] / mib:9.2f} {r['bytes'] / mib:7.2f} "
                     f"{r['dropped']:8d} {r['stripped']:8d}")
    tot0, tot = sum(r["original_bytes"] for r in rows), sum(r["bytes"] for r in rows)
    lines.append(f"{'total (' + str(len(rows)) + ' wheels)':<72} {tot0 / mib:9.2f} {tot / mib:7.2f}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ verification

IMPORT_CHECK = r"""
import os, sys
target = os.path.realpath(sys.argv[1])
import ray, ray.train, ray.data, deepspeed, datasets, trl, pydantic, pytest
for m in (ray, deepspeed, datasets, trl, pytest):
    assert os.path.realpath(m.__file__).startswith(target), f"{m.__name__} came from {m.__file__}, not {target}"
# a private Ray even when another runs on this machine (a bare ray.init would join it and refuse num_cpus)
ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
@ray.remote
def f(x):
    return x + 1
assert ray.get(f.remote(41)) == 42
ds = ray.data.range(8).map_batches(lambda b: {"id": b["id"] * 2})
assert sum(r["id"] for r in ds.take_all()) == 56
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer  # a one-worker Ray Train fit (gloo) from the trimmed wheel
def loop(config):
    import torch.distributed as dist
    assert dist.get_world_size() == 1
TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5})).fit()
ray.shutdown()
print("import check ok: ray", ray.__version__, "deepspeed", deepspeed.__version__, "datasets", datasets.__version__,
      "trl", trl.__version__)
"""  # noqa: E501 - a program's text, passed to python -c as it is


def install_target(out: Path, target: Path, pyver: str | None) -> None:
    wheels = [str(w) for w in sorted(out.glob("*.whl"))]
    flags = _target_flags(pyver) if pyver else []
    pip("install", "--no-index", "--no-deps", "--target", str(target), *flags, *wheels)


def verify(out: Path, pyver: str, strip: bool, rebuild: bool = True) -> None:
    local = f"{sys.version_info.major}.{sys.version_info.minor}"
    with tempfile.TemporaryDirectory(prefix="wheelhouse-target-") as t:
        install_target(out, Path(t), pyver)
        print(f"pip install --no-index --no-deps --target: all {len(list(out.glob('*.whl')))} wheels "
              f"accepted (Python {pyver})")
    if local != pyver:
        other = out.parent / f"{out.name}-py{local.replace('.', '')}"
        print(f"this interpreter is Python {local}, not {pyver}: building the same recipe for {local} in "
              f"{other} to import it (stored without compression: it is only imported here, never shipped)")
        if rebuild or not (other / "wheelhouse.json").exists():
            build(other, local, zipfile.ZIP_STORED, strip, log=lambda *_: None, reuse=out)
        out = other
    with tempfile.TemporaryDirectory(prefix="wheelhouse-target-") as t:
        install_target(out, Path(t), None)
        env = dict(os.environ, PYTHONPATH=t, RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1")
        r = subprocess.run([sys.executable, "-c", IMPORT_CHECK, t], capture_output=True, text=True, env=env,
                           timeout=600)
        if r.returncode:
            raise SystemExit(f"import check failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
        print(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "wheelhouse"))
    ap.add_argument("--python-version", default="3.12")
    ap.add_argument("--compression", choices=("lzma", "deflate"), default="lzma")
    ap.add_argument("--no-strip", action="store_true", help="keep symbol tables in native binaries")
    ap.add_argument("--limit-mib", type=float, default=60.0)
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--no-build", action="store_true", help="verify the wheelhouse already in --out")
    args = ap.parse_args()
    comp = zipfile.ZIP_LZMA if args.compression == "lzma" else zipfile.ZIP_DEFLATED
    out = Path(args.out)
    if args.no_build:
        rows = json.loads((out / "wheelhouse.json").read_text())["wheels"]
    else:
        rows = build(out, args.python_version, comp, not args.no_strip)
    print(size_table(rows))
    total = sum(r["bytes"] for r in rows) / 2 ** 20
    verdict = "under" if total < args.limit_mib else "OVER"
    print(f"{out}: {total:.1f} MiB, {verdict} the {args.limit_mib:.0f} MiB limit")
    if args.verify:
        verify(out, args.python_version, not args.no_strip, rebuild=not args.no_build)
    if total >= args.limit_mib:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
