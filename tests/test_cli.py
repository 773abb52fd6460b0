"""pymq as ops run it (the command line, a config file, signals) and as programs embed it."""

import os
import re
import signal
import subprocess
import sys
import textwrap

import pytest
from docopt import docopt

import pymq
from conftest import ROOT, RawClient


def run_pymq(*args, timeout=10):
    return subprocess.run([sys.executable, str(ROOT / "pymq.py"), *args], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_help_is_the_docopt_usage_text():
    result = run_pymq("--help")
    assert result.returncode == 0
    assert result.stdout.strip() == pymq.USAGE.strip()
    for name in pymq.DEFAULTS:
        assert "--" + name in result.stdout


def test_version():
    result = run_pymq("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == "pymq " + pymq.__version__


@pytest.mark.parametrize("args, message", [
    (["--port", "http"], "port"),
    (["--port", "70000"], "not a TCP port"),
    (["--heart-beat", "10"], "heart-beat"),
    (["--max-body", "-1"], "negative"),
    (["--config", "/nonexistent/pymq.conf"], "cannot read config file"),
])
def test_bad_options_exit_2_with_a_message(args, message):
    result = run_pymq(*args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--prot", "61613"], "pymq: unknown option --prot; did you mean --port?"),
    (["--port=61613", "--hearbeat", "0,0"],
     "unknown option --hearbeat; did you mean --heart-beat?"),
    (["--po", "61613"], "unknown option --po; did you mean --port?"),     # no abbreviations
    (["--no-such-option"], "pymq: unknown option --no-such-option (see pymq --help)"),
    (["61613"], "unexpected argument '61613'"),
    (["--port"], "option --port needs a value"),
    (["--log-level", "verbose"], "log-level: 'verbose' is not one of debug, info, warning, error"),
    (["-prot", "61613"], "pymq: unknown option -prot; did you mean -port?"),
    (["-maxmsgs", "10"], "pymq: unknown option -maxmsgs"),     # not in ocamlmq's -help list
    (["-dbport"], "option -dbport needs a value"),
    (["--debug=yes"], "option --debug takes no value"),
])
def test_unknown_or_misspelt_options_are_named_in_plain_words(args, message):
    result = run_pymq(*args)
    assert result.returncode == 2
    assert result.stderr.strip() == message or message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and "Usage:" not in result.stderr


@pytest.mark.parametrize("flag", ["-help", "--help", "-h"])
def test_help_in_ocamlmq_spelling_too(flag):
    result = run_pymq(flag)
    assert result.returncode == 0 and result.stdout.strip() == pymq.USAGE.strip()


def test_an_option_given_twice_the_later_wins(broker_process):
    broker = broker_process("--max-headers", "100", "-port", "0", "--max-headers=7")
    expect_max_headers_7(broker.address)
    assert broker.stop() == 0


def expect_max_headers_7(address, **login):
    """The broker at `address` runs with --max-headers 7: eight headers are too many."""
    client = RawClient(address)
    client.connect("1.2", **login)
    client.send("SEND", {"destination": "/topic/t", **{"h%d" % i: "v" for i in range(8)}})
    client.expect_error("too many headers")


def test_unknown_option_in_a_config_file_suggests_the_nearest(tmp_path):
    config = tmp_path / "pymq.conf"
    config.write_text("[pymq]\nprot = 1234\n")
    result = run_pymq("--config", str(config))
    assert result.returncode == 2
    assert "unknown option prot; did you mean port?" in result.stderr


def test_an_option_value_may_start_with_a_dash(broker_process):
    broker = broker_process("--login", "-me-", "--passcode", "--secret")
    client = RawClient(broker.address)
    client.connect("1.2", login="-me-", passcode="--secret")
    assert broker.stop() == 0


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory this process cannot write to: a read-only tmpfs as root (root ignores
    permission bits), mode 0500 otherwise."""
    path = tmp_path / "ro"
    path.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                       check=True)
        yield path
        subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.chmod(0o500)
        yield path
        path.chmod(0o700)


@pytest.mark.parametrize("where, cause", [
    ("missing", "does not exist"),
    ("file", "is not a directory"),
    ("read-only", "is not writable: "),      # "... not by this user", "... read-only filesystem"
])
def test_db_in_a_bad_directory_names_it_and_the_cause(tmp_path, request, where, cause):
    if where == "missing":
        directory = tmp_path / "no" / "such"
    elif where == "file":
        directory = tmp_path / "plain-file"
        directory.write_text("")
    else:
        directory = request.getfixturevalue("read_only_dir")
    result = run_pymq("--port", "0", "--db", str(directory / "pymq.db"))
    assert result.returncode == 1
    error = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert len(error) == 1, result.stderr
    assert str(directory) in error[0] and cause in error[0], error[0]


def test_log_level_warning_hides_info_lines(broker_process):
    # The broker's start-up line is INFO, so start at info and check the level another way:
    # a warning-level broker logs nothing for a connection that comes and goes.
    broker = broker_process("--log-level", "info")
    assert any(" INFO pymq: " in line for line in broker.log)
    assert broker.stop() == 0
    result = run_pymq("--log-level", "warning", "--port", "0", "--db", "/nonexistent/x.db")
    assert result.returncode == 1
    assert " INFO " not in result.stderr and " ERROR pymq: cannot start" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_run_line_serves_and_exits_cleanly_on_signal(broker_process, signum):
    broker = broker_process()
    assert broker.address[0] == "127.0.0.1"          # loopback unless told otherwise
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SUBSCRIBE", {"destination": "/topic/t", "id": "1"})
    assert broker.stop(signum) == 0
    assert client.expect("ERROR").headers["message"] == "server shutting down"
    client.expect_closed()
    assert not any("Traceback" in line for line in broker.log)


def test_on_pypy_the_command_line_sets_its_collector(broker_process):
    """On PyPy, pymq starts itself again (exec: the same process) with PYPY_GC_NURSERY=64MB and
    PYPY_GC_MIN=64MB, unless the environment sets a nursery (then it sets nothing); a
    PYPY_GC_MIN of the environment is kept. CPython's environment is left alone."""
    def collector(broker):
        with open("/proc/%d/environ" % broker.proc.pid, "rb") as f:
            entries = f.read().decode(errors="replace").split("\0")
        variables = dict(entry.split("=", 1) for entry in entries if "=" in entry)
        return {name: variables.get(name) for name in ("PYPY_GC_NURSERY", "PYPY_GC_MIN")}

    env = {name: value for name, value in os.environ.items() if not name.startswith("PYPY_GC")}
    pypy = sys.implementation.name == "pypy"
    broker = broker_process("--db", "memory:", env=env)
    assert collector(broker) == ({"PYPY_GC_NURSERY": "64MB", "PYPY_GC_MIN": "64MB"} if pypy
                                 else {"PYPY_GC_NURSERY": None, "PYPY_GC_MIN": None})
    client = RawClient(broker.address)
    client.connect("1.2")
    client.request("SEND", {"destination": "/queue/q"}, b"job")
    own_min = broker_process("--db", "memory:", env=dict(env, PYPY_GC_MIN="32MB"))
    assert collector(own_min) == ({"PYPY_GC_NURSERY": "64MB", "PYPY_GC_MIN": "32MB"} if pypy
                                  else {"PYPY_GC_NURSERY": None, "PYPY_GC_MIN": "32MB"})
    own_nursery = broker_process("--db", "memory:", env=dict(env, PYPY_GC_NURSERY="8MB"))
    assert collector(own_nursery) == {"PYPY_GC_NURSERY": "8MB", "PYPY_GC_MIN": None}
    assert broker.stop() == 0 and own_min.stop() == 0 and own_nursery.stop() == 0


def test_config_file_and_the_command_line_wins(broker_process, tmp_path):
    config = tmp_path / "pymq.conf"
    config.write_text("[pymq]\nlogin = alice\npasscode = s3cret\nmax-headers = 7\n")
    broker = broker_process("--config", str(config), "--login", "bob")
    client = RawClient(broker.address)
    client.send("CONNECT", {"accept-version": "1.2", "login": "alice", "passcode": "s3cret"})
    client.expect_error("bad credentials")
    expect_max_headers_7(broker.address, login="bob", passcode="s3cret")
    assert broker.stop() == 0


def test_options_merge_defaults_config_and_command_line(tmp_path):
    config = tmp_path / "pymq.conf"
    config.write_text("[pymq]\nport = 1234\nheart-beat-grace = 3\ndebug = yes\nlogin =\n")
    args = docopt(pymq.USAGE, ["--config", str(config), "--port", "4321"])
    options = pymq.options_from_args(args)
    assert options.port == 4321                  # command line wins
    assert options.heart_beat_grace == 3.0       # from the file, as its type
    assert options.debug is True
    assert options.login is None                 # empty means none
    assert options.host == "127.0.0.1"           # default


def test_config_file_errors(tmp_path):
    config = tmp_path / "pymq.conf"
    config.write_text("[pymq]\nprot = 1234\n")
    result = run_pymq("--config", str(config))
    assert result.returncode == 2 and "unknown option prot" in result.stderr
    config.write_text("[other]\nport = 1\n")
    result = run_pymq("--config", str(config))
    assert result.returncode == 2 and "no [pymq] section" in result.stderr


def conf_file_settings():
    text = (ROOT / "conf" / "pymq.conf").read_text()
    return dict(re.findall(r"^#([a-z-]+) =[ ]?(.*)$", text, re.M))


def test_conf_file_lists_every_option_with_its_default():
    settings = conf_file_settings()
    assert set(settings) == set(pymq.DEFAULTS)
    for name, value in settings.items():
        expected = pymq.DEFAULTS[name]
        assert pymq._convert(name, value) == expected, name


def test_conf_file_uncommented_is_a_valid_config(tmp_path):
    text = (ROOT / "conf" / "pymq.conf").read_text()
    config = tmp_path / "pymq.conf"
    config.write_text(re.sub(r"^#([a-z-]+ =)", r"\1", text, flags=re.M))
    options = pymq.options_from_args(docopt(pymq.USAGE, ["--config", str(config)]))
    assert repr(options) == repr(pymq.Options())


def test_readme_lists_every_option():
    readme = (ROOT / "README.md").read_text()
    for name in pymq.DEFAULTS:
        assert "--" + name in readme, name


def test_debug_logs_frames_to_stderr(broker_process):
    broker = broker_process("--debug")
    client = RawClient(broker.address)
    client.connect("1.2")
    broker.wait_for_log(r"CONNECT")
    client.close()
    assert broker.stop() == 0


EMBEDDED_PROGRAM = textwrap.dedent("""
    import logging, signal, sys
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    import gevent, gevent.monkey, gevent.socket
    import pymq
    assert not gevent.monkey.is_anything_patched(), "import pymq monkey-patched"
    assert not logging.getLogger().handlers, "import pymq configured logging"
    assert handlers == {s: signal.getsignal(s) for s in handlers}, "import pymq set signals"

    server = pymq.start(host="127.0.0.1", port=0, db="memory:")
    sock = gevent.socket.create_connection(server.address)
    sock.sendall(b"CONNECT\\naccept-version:1.2\\n\\n\\0")
    reply = sock.recv(4096)
    assert reply.startswith(b"CONNECTED\\n"), reply
    sock.close()
    server.stop()
    print("embedded ok", server.address[1] > 0)
""")


def test_embedded_in_a_gevent_program():
    result = subprocess.run([sys.executable, "-c", EMBEDDED_PROGRAM], capture_output=True,
                            text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "embedded ok True"


def test_readme_example_works(broker_process):
    """The stomp.py example in the README runs as written (on the test broker's port)."""
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import stomp, time\n.*?)```", readme, re.S).group(1)
    broker = broker_process()
    code = code.replace("61613", str(broker.address[1]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "working on resize 42.png"
    client = RawClient(broker.address)
    client.connect("1.2")
    receipt = client.request("SEND", {"destination": "/control/count-msgs/queue/jobs"})
    assert receipt.headers["num-messages"] == "0"        # the worker's ACK deleted it
    assert broker.stop() == 0
