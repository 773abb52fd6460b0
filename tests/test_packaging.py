"""pymq as it is installed and deployed: the distribution pymq-broker built from the checkout and
installed in a fresh virtualenv, run by that venv's `pymq` command alone; and what
conf/pymq.service relies on.

The venvs see the system's site-packages, or those of the venv the tests run in (gevent,
psycopg2, ... are reused: nothing is downloaded) but not the checkout: everything runs in
temporary directories, builds work on a copy (so that the checkout gets no build/ or
*.egg-info), without build isolation, and pip runs without an index: offline."""

import os
import re
import shlex
import shutil
import site
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest
from docopt import docopt

import pymq
from conftest import ROOT, TIMEOUT, stomp_connect

STORAGE_MODULES = sorted("pymq_storage/" + path.name for path in ROOT.glob("pymq_storage/*.py"))
CONF_FILES = ["conf/pymq.conf", "conf/pymq.service"]


def clean_env():
    """The environment minus what could show the checkout (or a user's site) to a venv."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(*command, cwd):
    """Run `command` in `cwd`; its stdout. Fails the test, with the output, if it fails."""
    result = subprocess.run([str(arg) for arg in command], cwd=cwd, env=clean_env(),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, "%s failed:\n%s%s" % (command, result.stdout, result.stderr)
    return result.stdout


def copy_of_checkout(dest):
    """The checkout's files, without what git, builds and runs leave in it."""
    shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(
        ".*", "__pycache__", "build", "dist", "*.egg-info", "*.db", "*.db-*"))
    return dest


def exchange_a_message(address):
    """With stomp.py: SUBSCRIBE to /queue/q, SEND with a receipt, receive the MESSAGE, ACK it."""
    conn, listener = stomp_connect(address)
    try:
        conn.subscribe("/queue/q", id="1", ack="client-individual")
        conn.send("/queue/q", "hello", receipt="sent")
        assert listener.receipts.get(timeout=TIMEOUT).headers["receipt-id"] == "sent"
        message = listener.next_message()
        assert message.body == "hello"
        conn.ack(message.headers["ack"], receipt="acked")
        assert listener.receipts.get(timeout=TIMEOUT).headers["receipt-id"] == "acked"
    finally:
        conn.disconnect()


@pytest.fixture(scope="module")
def workdir():
    path = Path(tempfile.mkdtemp(prefix="pymq-packaging-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def dists(workdir):
    """(sdist, wheel) by `python -m build`, which builds the wheel from the sdist, as pip does
    with an sdist from PyPI: so a file the build needs but the sdist lacks fails here."""
    source = copy_of_checkout(workdir / "src")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", workdir / "dist", source,
        cwd=workdir)
    (sdist,) = (workdir / "dist").glob("*.tar.gz")
    (wheel,) = (workdir / "dist").glob("*.whl")
    return sdist, wheel


@pytest.fixture
def venv(workdir):
    """A fresh virtualenv in a directory of its own, removed after the test."""
    home = Path(tempfile.mkdtemp(prefix="venv-", dir=workdir))
    try:
        run(sys.executable, "-m", "venv", "--system-site-packages", home / "venv", cwd=home)
        if sys.prefix != sys.base_prefix:
            # The tests run in a venv themselves (PyPy's in CI): its packages are the
            # "system's" for this one; after the new venv's own in sys.path.
            (site_packages,) = (home / "venv" / "lib").glob("*/site-packages")
            (site_packages / "outer-venv.pth").write_text("\n".join(site.getsitepackages()))
        yield home / "venv"
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("what", ["checkout", "wheel"])
def test_the_installed_pymq_command_serves(what, dists, venv, broker_process):
    """`pip install .` in a checkout, or of the wheel built from the sdist, gives a venv whose
    `pymq` runs a broker, from its own copy of pymq and pymq_storage."""
    home = venv.parent
    pip = [venv / "bin" / "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    if what == "checkout":
        run(*pip, "--no-build-isolation", copy_of_checkout(home / "src"), cwd=home)
    else:
        run(*pip, dists[1], cwd=home)
    imported = run(venv / "bin" / "python", "-c",
                   "import pymq, pymq_storage.sqlite; print(pymq.__file__, pymq_storage.__file__)",
                   cwd=home).split()
    for path in imported:
        assert Path(path).resolve().is_relative_to(venv.resolve()), imported
    for name in CONF_FILES:         # data_files: under the prefix, for the README's deployment
        assert (venv / "share" / "pymq" / Path(name).name).is_file()
    pymq_command = venv / "bin" / "pymq"
    assert run(pymq_command, "--version", cwd=home).strip() == "pymq " + pymq.__version__

    broker = broker_process("--db", str(home / "x.db"), command=[str(pymq_command)], cwd=home,
                            env=clean_env())
    exchange_a_message(broker.address)
    assert broker.stop() == 0
    assert (home / "x.db").is_file()
    assert not any("Traceback" in line for line in broker.log)


def test_the_sdist_has_what_the_build_and_deployment_need(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "requirements.txt",
              "pymq.py", *STORAGE_MODULES, *CONF_FILES]
    assert set(needed) <= names, set(needed) - names


def test_the_wheel_has_the_module_the_package_the_command_and_the_metadata(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        metadata = archive.read(info + "/METADATA").decode()
        entry_points = archive.read(info + "/entry_points.txt").decode()
    data = info.replace(".dist-info", ".data") + "/data/share/pymq/"
    expected = {"pymq.py", *STORAGE_MODULES, *(data + Path(name).name for name in CONF_FILES)}
    assert expected <= names, expected - names
    assert not [name for name in names if name.startswith("tests/")]
    assert [name for name in names if re.match(re.escape(info) + r"/(licenses/)?LICENSE$", name)]
    assert re.search(r"^\[console_scripts\]\npymq = pymq:main$", entry_points, re.M)
    for line in ["Name: pymq-broker", "Version: " + pymq.__version__, "License: MIT",
                 "Requires-Python: >=3.9", "Description-Content-Type: text/markdown"]:
        assert re.search("^%s$" % re.escape(line), metadata, re.M), line


def unit_settings():
    """conf/pymq.service as {key: [values]}."""
    settings = {}
    for line in (ROOT / "conf" / "pymq.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_runs_the_command_with_its_store_in_the_state_directory():
    unit = unit_settings()
    program, *argv = shlex.split(unit["ExecStart"][0])
    assert Path(program).name == "pymq"         # the console script setup.py installs
    args = docopt(pymq.USAGE, argv)             # exits if pymq has no such options
    assert args["--config"] == "/etc/pymq/pymq.conf"
    assert Path(args["--db"]).parent == Path("/var/lib") / unit["StateDirectory"][0]
    assert unit["CapabilityBoundingSet"] == [""] and pymq.DEFAULTS["port"] > 1024


# Runs argv[1:] with PR_SET_MDWE (PR_MDWE_REFUSE_EXEC_GAIN), the kernel's own form of
# MemoryDenyWriteExecute= (systemd >= 256 uses it); it is kept across execve.
NO_WRITE_EXECUTE = """
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    sys.exit("PR_SET_MDWE: " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


@pytest.mark.parametrize("store_backend", ["sqlite", "postgresql"], indirect=True)
def test_pymq_needs_no_writable_executable_memory(new_store, broker_process, tmp_path):
    """conf/pymq.service sets MemoryDenyWriteExecute=: pymq (CPython, gevent, greenlet, the
    store's driver) must serve with the kernel refusing memory both writable and executable."""
    if sys.implementation.name == "pypy":
        pytest.skip("PyPy's JIT writes the code it runs: conf/pymq.service says to set "
                    "MemoryDenyWriteExecute=false for PyPy")
    wrapper = [sys.executable, "-c", NO_WRITE_EXECUTE]
    probe = subprocess.run(
        wrapper + [sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    if "PR_SET_MDWE" in probe.stderr:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3): " + probe.stderr.strip())
    assert "PermissionError" in probe.stderr, probe      # W+X refused: the check is real
    broker = broker_process("--db", new_store(),
                            command=wrapper + [sys.executable, str(ROOT / "pymq.py")],
                            cwd=tmp_path)
    exchange_a_message(broker.address)
    assert broker.stop() == 0
