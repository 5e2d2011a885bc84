"""scripts/wheelhouse.py's wheel surgery on a small synthetic wheel: no network, a second or two.

The full build (downloads, Ray's real wheel, the import check) is `make wheelhouse` (docs/deploy.md)."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("wheelhouse", ROOT / "scripts" / "wheelhouse.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


wh = _load()


def _hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def fake_ray_wheel(folder: Path) -> Path:
    """A wheel shaped like Ray's: a package, Java jars, a dashboard build with a source map, an executable."""
    files = {
        "fakeray/__init__.py": b"VALUE = 42\n",
        "fakeray/core/raylet": b"#!/bin/sh\necho raylet\n",
        "fakeray/jars/ray_dist.jar": b"PK" + b"j" * 5000,
        "fakeray/dashboard/client/build/static/js/main.js": b"console.log(1)\n",
        "fakeray/dashboard/client/build/static/js/main.js.map": b"{}" * 3000,
        "fakeray/dashboard/head.py": b"# kept\n",
        "fakeray/tests/test_x.py": b"def test(): pass\n",
    }
    dist = "fakeray-1.0.dist-info"
    files[f"{dist}/METADATA"] = b"Metadata-Version: 2.1\nName: fakeray\nVersion: 1.0\n"
    files[f"{dist}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    path = folder / "fakeray-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        rows = []
        for name, data in files.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name.endswith("raylet") else 0o644) << 16
            z.writestr(info, data)
            rows.append(f"{name},{_hash(data)},{len(data)}")
        z.writestr(f"{dist}/RECORD", "\n".join(rows + [f"{dist}/RECORD,,"]) + "\n")
    return path


def test_trim_drops_the_patterns_and_rewrites_record(tmp_path):
    src = fake_ray_wheel(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / src.name
    rules = tuple(p.replace("ray/", "fakeray/", 1) for p in wh.TRIM["ray"])
    stats = wh.trim_wheel(src, dst, rules)
    assert stats["dropped"] == 4  # the jar, the dashboard build (js + its map), the tests
    with zipfile.ZipFile(dst) as z:
        names = set(z.namelist())
        assert all(i.compress_type == zipfile.ZIP_LZMA for i in z.infolist())
        assert not any("jars/" in n or n.endswith(".map") or "/tests/" in n or "client/build" in n
                       for n in names)
        assert {"fakeray/__init__.py", "fakeray/core/raylet", "fakeray/dashboard/head.py"} <= names
        assert (z.getinfo("fakeray/core/raylet").external_attr >> 16) & 0o111, "the executable bit is kept"
        record = list(csv.reader(io.StringIO(z.read("fakeray-1.0.dist-info/RECORD").decode())))
    listed = {row[0]: row for row in record}
    assert set(listed) == names, "RECORD lists exactly the files in the wheel"
    with zipfile.ZipFile(dst) as z:
        for name, digest, size in record:
            if digest:  # every file but RECORD itself carries its hash and size
                data = z.read(name)
                assert digest == _hash(data) and int(size) == len(data), name


def test_trimmed_wheel_installs_with_pip_and_imports(tmp_path):
    """pip accepts the re-packed (LZMA, new RECORD) wheel offline, the way the air-gapped box installs it."""
    src = fake_ray_wheel(tmp_path)
    house = tmp_path / "house"
    house.mkdir()
    wh.trim_wheel(src, house / src.name, ("fakeray/jars/*", "*.map"))
    target = tmp_path / "target"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(target), str(house / src.name)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not (target / "fakeray" / "jars").exists()
    r = subprocess.run([sys.executable, "-c", "import fakeray, sys; sys.exit(fakeray.VALUE != 42)"],
                       env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_not_a_wheel_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad-1.0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("bad/__init__.py", "")
    with pytest.raises(ValueError, match="no .*RECORD: not a wheel"):
        wh.trim_wheel(bad, tmp_path / "out.whl")


def test_size_table_totals():
    rows = [{"wheel": "a.whl", "original_bytes": 3 << 20, "bytes": 1 << 20, "dropped": 2, "stripped": 0},
            {"wheel": "b.whl", "original_bytes": 1 << 20, "bytes": 1 << 20, "dropped": 0, "stripped": 1}]
    text = wh.size_table(rows)
    assert "total (2 wheels)" in text and "4.00" in text and "2.00" in text


@pytest.mark.slow
def test_make_wheelhouse_from_a_fresh_home_fits_and_imports(tmp_path):
    """``make wheelhouse`` as a user types it, from a fresh HOME (no pip cache, no torch extensions) and a
    minimal environment: downloads, trims, stays under 60 MiB, installs offline and imports (its --verify).
    Skipped, with the reason, where the package index cannot be reached."""
    import os
    import socket
    import urllib.parse

    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    # the machine's index
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        if key in os.environ:
            env[key] = os.environ[key]
    r = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    index = next((ln.split("=", 1)[1].strip("'\" ").split()[0] for ln in r.stdout.splitlines()
                  if ln.split("=", 1)[0].endswith(".index-url")), "https://pypi.org/simple")
    host = urllib.parse.urlparse(index).hostname
    if host:
        try:
            socket.create_connection((host, urllib.parse.urlparse(index).port or 443), timeout=5).close()
        except OSError as e:
            pytest.skip(f"the package index {index} cannot be reached: {e}")
    out = tmp_path / "wheelhouse"
    r = subprocess.run(["make", "-s", "wheelhouse", f"WHEELHOUSE_ARGS=--out {out}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    assert 0 < total <= 60 * 2**20, f"{total / 2**20:.1f} MiB"
    assert "under the 60 MiB limit" in r.stdout
