"""``pllava up``: N encoders and a decoder as local processes, captioning, clean shutdown."""
from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pllava_serving.launcher import (Cluster, LaunchError, ServerProcess, _reachable, ensure_tiny_model, launch,
                                     parse_setting, run_foreground, settings_env)
from pllava_client import CaptionError, Client
from pllava_client.health import check_health
from servers import console_script

# The encoder's one line per request: "<video>: 4 frames -> 576 visual tokens (decode ...)".
ENCODED = re.compile(r"frames -> \d+ visual tokens \(decode")
READY = re.compile(r"^pllava up: decoder at (\S+) \(\d+ encoder\(s\) at (.*)\);")


def pllava_up(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pllava.cli", "up", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def read_lines(stream, into: queue.Queue, keep: list) -> threading.Thread:
    def pump():
        for line in stream:
            keep.append(line)
            into.put(line)
        into.put(None)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return thread


def refused(address: str) -> bool:
    """True if nothing answers at ``address`` any more."""
    try:
        check_health(address, timeout=3)
    except Exception:  # grpc.RpcError: UNAVAILABLE or DEADLINE_EXCEEDED
        return True
    return False


def test_pllava_up_two_encoders_caption_and_clean_shutdown(tiny_model_dir, videos_dir):
    # The decoder's visual-token cache is off (a setting passed through), so each caption goes
    # to an encoder and round robin has four calls to spread over the two replicas.
    up = pllava_up("--model", tiny_model_dir, "--encoders", 2, "--port", 0, "--max-batch", 3,
                   "--max-context", 1024, "--max-queue", 5, "--decoder-setting", "visual_cache_bytes=0",
                   "--encoder-setting", "video_workers=1")
    out_lines: queue.Queue = queue.Queue()
    stdout, stderr = [], []
    read_lines(up.stdout, out_lines, stdout)
    err_reader = read_lines(up.stderr, queue.Queue(), stderr)
    try:
        while True:
            line = out_lines.get(timeout=300)
            assert line is not None, "pllava up ended before it was ready:\n" + "".join(stderr[-40:])
            ready = READY.match(line)
            if ready:
                break
        address, encoders = ready.group(1), ready.group(2).split(", ")
        assert len(encoders) == 2 and address not in encoders

        with Client(address, timeout=120) as client:
            info = client.info()
            assert (info.max_batch, info.max_context, info.max_queue) == (3, 1024, 5)
            captions = [client.caption_full(videos_dir / name, max_new_tokens=6)
                        for name in ("orbit.mp4", "portrait.mp4", "orbit.mp4", "portrait.mp4")]
        assert all(len(c.token_ids) == 6 for c in captions)
        assert captions[0].token_ids == captions[2].token_ids      # greedy: same video, same tokens

        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=120) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    err_reader.join(30)
    log = "".join(stderr)

    # Both encoder replicas got work: the launcher prefixes each server's lines with its name.
    for name in ("encoder-0", "encoder-1"):
        served = [l for l in log.splitlines() if l.startswith(f"{name} | ") and ENCODED.search(l)]
        assert served, f"{name} encoded nothing:\n{log[-3000:]}"
    assert sum(bool(ENCODED.search(l)) for l in log.splitlines()) == 4

    # Clean shutdown: decoder first, every server drained and stopped, nothing listens any more.
    assert "pllava up: SIGTERM, stopping the servers" in "".join(stdout)
    stopped = [l.split(" | ")[0] for l in log.splitlines() if re.search(r"pllava_serving\.server \[-\] stopped$", l)]
    assert stopped and stopped[0] == "decoder" and sorted(stopped) == ["decoder", "encoder-0", "encoder-1"], \
        f"servers that logged 'stopped': {stopped}; the launcher's output:\n{log[-6000:]}"
    for server in [address, *encoders]:
        assert refused(server), f"{server} still answers after shutdown"


def test_launch_api_returns_handles_and_stops(tiny_model_dir, videos_dir):
    with launch(tiny_model_dir, encoders=1, port=0, echo=None) as cluster:
        assert [s.alive() for s in cluster.servers] == [True, True]
        assert check_health(cluster.address) == "SERVING"
        with Client(cluster.address, timeout=120) as client:
            assert client.info().encoder_target == "ipv4:" + cluster.encoders[0].address
            assert len(client.caption_full(videos_dir / "portrait.mp4", max_new_tokens=3).token_ids) == 3
        assert any(ENCODED.search(line) for line in cluster.encoders[0].logs())
    assert [s.process.returncode for s in cluster.servers] == [0, 0]
    with pytest.raises(CaptionError):
        Client(cluster.address, timeout=5).caption_full(videos_dir / "portrait.mp4")


def server_children(parent: int | None = None) -> list[str]:
    """Command lines of ``parent``'s (default: this process's) children that are PLLaVA servers."""
    parent = os.getpid() if parent is None else parent
    found = []
    for proc in Path("/proc").iterdir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and ("pllava-encoder" in cmdline or "pllava-decoder" in cmdline):
            found.append(cmdline)
    return found


def test_launch_fails_clearly_and_leaves_nothing_running(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(LaunchError, match=r"encoder-0 exited with status [1-9]") as info:
        launch(broken, encoders=1, port=0, echo=None, ready_timeout=120)
    assert "its last lines" in str(info.value)
    assert server_children() == []


def test_servers_die_with_a_killed_launcher(tiny_model_dir):
    up = pllava_up("--model", tiny_model_dir, "--port", 0)
    try:
        for line in up.stdout:
            if READY.match(line):
                break
        else:
            pytest.fail("pllava up ended before it was ready:\n" + up.stderr.read()[-3000:])
        children = server_children(up.pid)
        assert len(children) == 2
        address = READY.match(line).group(1)
    finally:
        up.kill()           # SIGKILL: the launcher cannot stop anything itself
        up.wait()
    # The servers got SIGTERM from the kernel (PR_SET_PDEATHSIG) and drain and exit.
    deadline = time.monotonic() + 120
    while not refused(address) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert refused(address), "the decoder outlived its launcher"


def test_ensure_tiny_model_makes_it_once(tmp_path):
    target = tmp_path / "cache" / "tiny"
    made = ensure_tiny_model(target)
    assert made == target and (target / "config.json").exists()
    stamp = (target / "config.json").stat().st_mtime_ns
    assert ensure_tiny_model(target) == target
    assert (target / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in target.parent.iterdir()] == ["tiny"]   # no temporary folder left
    other = tmp_path / "cache" / "other"
    (other / "notes").mkdir(parents=True)
    with pytest.raises(LaunchError, match=r"other holds files but no config.json: not a model folder; move it away"):
        ensure_tiny_model(other)


def encoder_process(model_dir) -> ServerProcess:
    return ServerProcess("encoder-0", [console_script("pllava-encoder"), "--model", str(model_dir),
                                       "--host", "127.0.0.1", "--port", "0"])


def test_a_restarted_server_binds_its_first_port_after_a_restart_that_failed(tiny_model_dir):
    """The decoder knows an encoder by the port it first bound: a restart whose port was taken
    meanwhile fails before binding, and the next one binds that port again (it used to take a
    new random one, which the decoder never learnt)."""
    server = encoder_process(tiny_model_dir)
    try:
        first = server.wait_bound(120)
        server.signal(signal.SIGKILL)
        server.wait(30)
        squatter = socket.socket()
        try:
            squatter.bind(("127.0.0.1", int(first.rpartition(":")[2])))
            squatter.listen()
            server.restart()
            assert server.wait(120) not in (None, 0), server.tail()
        finally:
            squatter.close()
        server.restart()
        assert server.wait_bound(120) == first, server.tail()
    finally:
        server.signal(signal.SIGKILL)
        server.wait(30)


def test_a_broken_output_does_not_keep_the_launcher_from_stopping_the_servers(tiny_model_dir):
    """``pllava up | tee log`` and Ctrl-C ends tee too: the launcher's farewell line meets a
    broken pipe, and the servers are stopped all the same."""
    server = encoder_process(tiny_model_dir)
    reader, writer = os.pipe()
    os.close(reader)
    out = os.fdopen(writer, "w")
    original = signal.getsignal(signal.SIGTERM)

    def terminate_once_handled():
        while signal.getsignal(signal.SIGTERM) is original:  # not before run_foreground handles it
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        server.wait_bound(120)
        threading.Thread(target=terminate_once_handled, daemon=True).start()
        assert run_foreground(Cluster([server], None), out=out, grace=30, restart=False) == 0
        assert not server.alive()
    finally:
        server.signal(signal.SIGKILL)
        server.wait(30)
        with contextlib.suppress(OSError):
            out.close()


@pytest.mark.parametrize("bound, reached", [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"),
                                            ("[::]", "127.0.0.1"), ("[::1]", "[::1]"), ("10.1.2.3", "10.1.2.3")])
def test_the_address_a_server_reports_is_one_clients_can_dial(bound, reached):
    """An IPv6 address keeps its brackets ([::1]:P is a gRPC target and a URL host; ::1:P is neither)."""
    assert _reachable(bound) == reached


def test_pllava_up_default_model_is_the_cached_tiny_one(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from pllava_serving.launcher import default_model_dir

    assert default_model_dir() == Path(tmp_path) / "pllava" / "tiny"


def test_the_model_package_does_not_import_grpc():
    """``pllava up`` lives on in pllava.cli, but its launcher is serving code imported only
    when it runs: no module of the model package imports grpc or a serving package."""
    code = ("import sys, pllava.cli; pllava.cli.build_parser().parse_args(['up', '--max-batch', '2']); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'pllava_client', 'pllava_serving')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    serving = re.compile(r"^(import|from)\s+(grpc|pllava_client|pllava_proto|pllava_serving|pllava_encoder|pllava_decoder)\b",
                         re.MULTILINE)
    package = Path(__file__).resolve().parents[1] / "pllava"
    top_level = {f.name: serving.findall(f.read_text()) for f in package.glob("*.py")}
    assert not any(top_level.values()), top_level
    assert not (package / "launcher.py").exists()


def test_settings_reach_the_servers_as_their_environment():
    assert settings_env("PLLAVA_DECODER_", {"max_batch": 4, "visual-cache-bytes": 0, "dtype": None,
                                            "jit": True}) == {
        "PLLAVA_DECODER_MAX_BATCH": "4", "PLLAVA_DECODER_VISUAL_CACHE_BYTES": "0",
        "PLLAVA_DECODER_DTYPE": "none", "PLLAVA_DECODER_JIT": "true"}
    assert parse_setting("max-queue=5") == ("max_queue", "5")
    assert parse_setting("stop=a=b") == ("stop", "a=b")
    for bad in ("max_batch", "=4"):
        with pytest.raises(ValueError, match="NAME=VALUE"):
            parse_setting(bad)
    done = subprocess.run([sys.executable, "-m", "pllava.cli", "up", "--decoder-setting", "oops"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "expected NAME=VALUE" in done.stderr


def test_a_setting_the_launcher_gives_itself_is_refused_with_the_option_to_use(tiny_model_dir):
    """The launcher passes these as flags, which beat the environment the settings travel in:
    they used to be dropped without a word."""
    for kwargs, words in ((dict(decoder_settings={"port": 6000}), "--decoder-setting port: set by pllava up itself; "
                                                                   "use --port"),
                          (dict(encoder_settings={"model": "/x", "host": "0.0.0.0"}), "--encoder-setting host, model"),
                          (dict(openai_settings={"port": 1}), "use --openai-port"),
                          (dict(device="CPU", decoder_settings={"device": "GPU"}), "use --device")):
        with pytest.raises(ValueError, match=re.escape(words)):
            launch(tiny_model_dir, port=0, echo=None, **kwargs)
    assert server_children() == []


def test_an_unknown_setting_is_named_by_the_server(tiny_model_dir):
    with pytest.raises(LaunchError, match=r"(?s)decoder exited with status [1-9].*PLLAVA_DECODER_NO_SUCH_THING"
                       ) as info:
        launch(tiny_model_dir, port=0, echo=None, ready_timeout=120, decoder_settings={"no_such_thing": 1})
    assert "its last lines" in str(info.value)
    assert server_children() == []


def test_demo_script_captions_and_stops_the_servers(tiny_model_dir, videos_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(repo / "scripts" / "demo.sh"), str(videos_dir / "portrait.mp4"),
                           "--max-new-tokens", "5", "--json"],
                          env={**os.environ, "MODEL": str(tiny_model_dir), "ENCODERS": "1", "PORT": str(port)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"pllava up: decoder at 127.0.0.1:{port}" in done.stderr
    assert len(json.loads(done.stdout)["token_ids"]) == 5
    assert refused(f"127.0.0.1:{port}")
