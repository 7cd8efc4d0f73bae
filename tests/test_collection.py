"""Captioning a whole collection: ``pllava-caption DIR ... --out FILE.jsonl`` and
``Client.caption_many``, against several real decoders.

First the parts that need no server (which files, the JSON-lines file, decoder lists), then
one encoder and two decoders in subprocesses (``--max-batch 2`` each) on the tiny checkpoint:
a collection with a broken file, resumed after errors, after a torn line and after SIGKILL;
round robin over a comma list of decoders; a decoder killed in the middle of a collection;
the progress bar on a terminal.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pty
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from concurrent import futures
from pathlib import Path

import numpy as np
import pytest

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pllava_client import CaptionFile, CaptionResult, Client, expand_inputs
from pllava_client.channel import MAX_CONNECTION_AGE_MS, channel_options, grpc_target, server_count, server_options
from other_user import as_another_user, open_folder
from servers import console_script, start_decoder, start_encoder

MAX_BATCH = 2


# ---------------------------------------------------------------------------------------
# No server
# ---------------------------------------------------------------------------------------

def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_inputs_from_folders_lists_and_patterns(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a/1.mp4", "a/2.MOV", "a/notes.md", "a/.hidden.mp4", "a/.cache/3.mp4", "a/sub/4.jpg",
                 "b/5.webm", "b/6.mkv", "c/7.mp4"):
        touch(tmp_path / name)
    touch(tmp_path / "list.txt", b"# the list\n\nc/7.mp4\n  b/5.webm  \nb\nmissing.mp4\n")
    out = touch(tmp_path / "a" / "captions.mp4")  # the output file is never an input

    got = expand_inputs(["a", "list.txt", "b/*.mkv", "a/1.mp4", "./a/1.mp4"], exclude=[out])
    assert got == ["a/1.mp4", "a/2.MOV", "a/sub/4.jpg", "c/7.mp4", "b/5.webm", "b/6.mkv", "missing.mp4"]
    # A file named on its own is taken whatever its ending; a pattern that matches nothing is an error.
    assert expand_inputs(["a/notes.md"]) == ["a/notes.md"]
    with pytest.raises(ValueError, match="no file matches"):
        expand_inputs(["nowhere/*.mp4"])


def test_caption_many_refuses_one_path_and_a_video_name():
    """Mistakes caught before any file is read or any call made (no server listens here)."""
    with Client("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match=r"takes a list of video paths, got str 'a.mp4'; .* pass \[path\]"):
            client.caption_many("a.mp4", concurrency=1)
        with pytest.raises(TypeError, match="names each video by its path; it takes no video_name"):
            client.caption_many(["a.mp4"], concurrency=1, video_name="x")


def test_caption_file_appends_whole_lines_and_tolerates_a_torn_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "out" / "captions.jsonl"
    out = CaptionFile(path)
    assert out.read().ok == set()
    with out:
        out.append({"path": "a.mp4", "sha256": "aa", "status": "error", "code": "UNAVAILABLE"})
        out.append({"path": "b.mp4", "sha256": "bb", "status": "ok", "caption": "é\nnew line"})
    with open(path, "ab") as f:  # a crash in the middle of a line (e.g. power loss)
        f.write(b'{"path": "c.mp4", "sha256": "cc", "sta')
    done = out.read()
    a, b = str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4")  # lines without realpath: resolved here
    assert done.ok == {(b, "bb")} and done.failed == {(a, "aa")} and done.unreadable_lines == 1
    assert done.skip("./b.mp4", "bb") and done.skip(b, "bb") and not done.skip("b.mp4", "other-content")
    assert not done.skip("a.mp4", "aa") and done.skip("a.mp4", "aa", retry_failed=False)

    with out:  # the torn line is ended before anything is appended
        out.append({"path": "a.mp4", "sha256": "aa", "status": "ok"})
    lines = path.read_bytes().split(b"\n")
    assert lines[2] == b'{"path": "c.mp4", "sha256": "cc", "sta' and json.loads(lines[3])["status"] == "ok"
    done = out.read()
    assert done.ok == {(a, "aa"), (b, "bb")} and done.failed == set()


def test_a_file_is_one_video_however_it_is_named_and_settings_count(tmp_path, monkeypatch):
    """A relative name, an absolute one and a link to the file are one video, in the inputs
    and in what a rerun skips, from any working folder; a caption made with other settings
    is not one with these; a second run on the same file is refused."""
    from pllava_client.collection import FileInUse, VideoResult, request_settings

    video = touch(tmp_path / "v" / "clip.mp4")
    (tmp_path / "link").symlink_to(tmp_path / "v")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs(["v/clip.mp4", str(video), "link/clip.mp4", "link"]) == ["v/clip.mp4"]

    settings = request_settings("What happens?", dict(max_new_tokens=8, stop=("x",), timeout=3))
    assert settings == {"prompt": "What happens?", "max_new_tokens": 8, "num_frames": 0, "repetition_penalty": None,
                        "seed": None, "stop": ["x"], "temperature": None, "template": None, "top_k": None,
                        "top_p": None}  # every field, a default where none was given; no timeout: no effect on text
    # what the CLI passes (every field, defaults included, numbers of any kind) records the same
    assert request_settings("What happens?", dict(max_new_tokens=np.int64(8), stop=["x"], num_frames=0, seed=None,
                                                  temperature=None, template=None)) == settings
    out = CaptionFile(tmp_path / "captions.jsonl")
    with out:
        out.append(VideoResult("v/clip.mp4", "ok", size=1, sha256="s", settings=settings,
                               result=CaptionResult(caption="c")).to_json())
        out.append({"path": "old.mp4", "sha256": "o", "status": "ok"})  # a line from before settings were kept
        with pytest.raises(FileInUse, match="being written by another run"):
            CaptionFile(tmp_path / "captions.jsonl").open()
    line = read_lines(tmp_path / "captions.jsonl")[0]
    assert line["realpath"] == str(video) and line["settings"] == settings
    monkeypatch.chdir(tmp_path / "v")  # another working folder, another spelling
    done = out.read(settings)
    assert done.skip("clip.mp4", "s") and done.skip("../link/clip.mp4", "s")
    assert done.skip("old.mp4", "o")  # a line without realpath is resolved from the rerun's working folder
    other = out.read(request_settings("Another question", dict(max_new_tokens=8, stop=("x",))))
    assert not other.skip("clip.mp4", "s") and other.other_settings == 1 and other.skip("old.mp4", "o")


def test_folders_are_searched_through_links_once_and_an_unreadable_one_is_an_error():
    with open_folder("pllava-walk-") as root:
        touch(root / "shared" / "a.mp4")
        touch(root / "coll" / "own.mp4")
        (root / "coll" / "linked").symlink_to(root / "shared")
        (root / "shared" / "loop").symlink_to(root / "coll")  # a cycle ends
        assert sorted(expand_inputs([root / "coll"])) == sorted([str(root / "coll" / "linked" / "a.mp4"),
                                                                str(root / "coll" / "own.mp4")])
        locked = root / "coll" / "locked"
        touch(locked / "b.mp4")
        locked.chmod(0o000)
        with as_another_user():
            with pytest.raises(ValueError, match=f"cannot search the folder {locked}: Permission denied"):
                expand_inputs([root / "coll"])
            unsearchable = []  # what the CLI does: a warning, and the rest of the collection
            assert sorted(expand_inputs([root / "coll"], unsearchable=unsearchable)) == sorted(
                [str(root / "coll" / "linked" / "a.mp4"), str(root / "coll" / "own.mp4")])
            assert unsearchable == [f"cannot search the folder {locked}: Permission denied"]
        locked.chmod(0o755)


def test_an_unreadable_file_is_recorded_once_and_a_failing_input_list_is_raised(tmp_path):
    """No server needed. A file that cannot be read gets its FILE_ERROR line once with
    --no-retry-failed (every rerun added one); an iterator of paths that fails midway stops
    the run with its own exception (a worker died of it and the run ended as if complete)."""
    out = CaptionFile(tmp_path / "captions.jsonl")
    gone = str(tmp_path / "gone.mp4")
    with Client("127.0.0.1:1") as client, out:
        (first,) = client.caption_many([gone], concurrency=1)
        assert first.status == "error" and first.code == "FILE_ERROR" and first.sha256 is None
        out.append(first.to_json())
        recorded = out.read(first.settings)
        (again,) = client.caption_many([gone], concurrency=1,
                                       skip=lambda p, d: recorded.skip(p, d, retry_failed=False))
        assert again.status == "skipped"
        (retried,) = client.caption_many([gone], concurrency=1, skip=recorded.skip)
        assert retried.status == "error"

        def listing():
            yield gone
            raise ConnectionError("the listing broke off")
        with pytest.raises(ConnectionError, match="the listing broke off"):
            list(client.caption_many(listing(), concurrency=2))


def test_a_file_too_large_for_a_request_is_hashed_not_held(tmp_path):
    """No server needed: a 64 MB file against a channel that carries 1 MB is recorded as a
    FILE_ERROR from its size and hash, never read into memory whole."""
    import tracemalloc

    big = tmp_path / "big.mp4"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    with Client("127.0.0.1:1", options=[("grpc.max_send_message_length", 1 << 20)]) as client:
        tracemalloc.start()
        try:
            (result,) = client.caption_many([big], concurrency=1)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert result.status == "error" and result.code == "FILE_ERROR" and result.size == 64 << 20
    assert result.sha256 == hashlib.sha256(bytes(64 << 20)).hexdigest()
    assert "the video is 67108864 bytes; one request carries at most" in result.message
    assert peak < 8 << 20, peak


def test_decoder_lists_become_static_round_robin_targets():
    assert grpc_target("127.0.0.1:5,127.0.0.1:6") == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert grpc_target(" localhost:5 , 127.0.0.1:6") == "ipv4:127.0.0.1:5,127.0.0.1:6"
    assert grpc_target("[::1]:5,[::1]:6") == "ipv6:[::1]:5,[::1]:6"
    for unchanged in ("localhost:50052", "dns:///decoders:50052", "ipv4:127.0.0.1:5,127.0.0.1:6",
                      "unix:/tmp/decoder.sock"):
        assert grpc_target(unchanged) == unchanged
    for bad, why in (("127.0.0.1:5,", "empty item"), ("127.0.0.1,127.0.0.1:6", "no port"),
                     ("127.0.0.1:x,127.0.0.1:6", "bad port")):
        with pytest.raises(ValueError, match=why):
            grpc_target(bad)
    assert server_count("127.0.0.1:5,127.0.0.1:6,127.0.0.1:7") == 3
    assert server_count("dns:///127.0.0.1:5") == 1 and server_count("localhost:5") == 1
    assert server_count("unix:/tmp/decoder.sock") is None


def test_old_connections_are_renewed_without_cutting_running_calls():
    """Servers send GOAWAY after max_connection_age_ms, so a dns:/// client resolves again
    and finds replicas added since (an autoscaler's); a stream already running (a long
    caption) is not cut, and the next call opens a new connection by itself."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options(max_connection_age_ms=300))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=channel_options(round_robin=True)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            time.sleep(1.5)  # five times the connection age
            servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING  # still streaming
            watch.cancel()
            for _ in range(3):
                assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10,
                                  wait_for_ready=True).status == health_pb2.HealthCheckResponse.NOT_SERVING
                time.sleep(0.4)
    finally:
        server.stop(0)
    assert dict(server_options())["grpc.max_connection_age_ms"] == MAX_CONNECTION_AGE_MS
    assert "grpc.max_connection_age_grace_ms" not in dict(server_options())  # no limit on running calls


# ---------------------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("collection-servers")


@pytest.fixture(scope="module")
def encoder(tiny_model_dir, logs):
    with start_encoder(tiny_model_dir, log_dir=logs) as server:
        yield server


def start_small_decoder(model_dir, encoder, logs):
    return start_decoder(model_dir, encoder.address, logs, "--max-batch", str(MAX_BATCH))


@pytest.fixture(scope="module")
def decoders(tiny_model_dir, encoder, logs):
    with start_small_decoder(tiny_model_dir, encoder, logs) as first, start_small_decoder(tiny_model_dir, encoder, logs) as second:
        yield first, second


@pytest.fixture(scope="module")
def both(decoders) -> str:
    """The two decoders as one comma-list target."""
    return ",".join(d.address for d in decoders)


def caption_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([console_script("pllava-caption"), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def ended(run: subprocess.Popen, timeout: float = 120) -> str:
    """The stderr of a pllava-caption run once it has ended; past ``timeout``, a failure
    showing where each of its threads was (it prints them on SIGUSR1)."""
    try:
        return run.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        run.send_signal(signal.SIGUSR1)
        time.sleep(2)
        run.kill()
        pytest.fail(f"pllava-caption did not end within {timeout} s:\n{run.communicate()[1]}")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


CAPTIONED = re.compile(r"captioned (\S+):")


def captioned_by(server) -> list[str]:
    """Videos a decoder's log says it captioned."""
    return CAPTIONED.findall(server.log_text())


@pytest.fixture
def collection(tmp_path, videos_dir) -> Path:
    """Three clips and the still image in a folder tree, one file that is not a video, and a
    text file that is not a list input (a folder search skips it)."""
    root = tmp_path / "collection"
    for name in ("orbit.mp4", "short.mp4", "still.jpg"):
        touch(root / name, (videos_dir / name).read_bytes())
    touch(root / "sub" / "portrait.mp4", (videos_dir / "portrait.mp4").read_bytes())
    touch(root / "sub" / "broken.mp4", b"this is not a video\n")
    touch(root / "sub" / "notes.md", b"not an input")
    return root


def test_a_collection_is_captioned_resumed_and_finished(decoders, both, collection, tmp_path):
    out = tmp_path / "captions.jsonl"
    common = ("--out", out, "--server", both, "--max-new-tokens", 7, "--progress-every", 0.05)
    run = caption_cli(collection, *common)
    assert run.returncode == 1, run.stderr  # one input failed
    # The default concurrency is what the decoders report: their batch size, times two decoders.
    assert f"{2 * MAX_BATCH} at a time" in run.stderr
    lines = read_lines(out)
    assert len(lines) == 5
    by_path = {Path(line["path"]).relative_to(collection).as_posix(): line for line in lines}
    assert set(by_path) == {"orbit.mp4", "short.mp4", "still.jpg", "sub/portrait.mp4", "sub/broken.mp4"}
    for rel, line in by_path.items():
        data = (collection / rel).read_bytes()
        assert (line["size"], line["sha256"]) == (len(data), hashlib.sha256(data).hexdigest())
    broken = by_path.pop("sub/broken.mp4")
    assert broken["status"] == "error" and broken["code"] == "INVALID_ARGUMENT"
    assert "not a video" in broken["message"] and broken["attempts"] == 1
    for line in by_path.values():
        assert line["status"] == "ok" and line["finish_reason"] == "length"
        assert line["num_generated_tokens"] == 7 and line["num_visual_tokens"] == 576
        assert line["caption"] and line["timings"]["total_ms"] > 0 and line["num_prompt_tokens"] > 0
        assert 0 < line["num_prompt_tokens_reused"] < line["num_prompt_tokens"]  # the template's leading text
    # A still image is one frame; the model repeats it in time, so it gives a video's 576 tokens.
    assert by_path["still.jpg"]["num_frames"] == 1 and by_path["orbit.mp4"]["num_frames"] == 4
    # Both decoders did some of the work, and the caption is the one a single call gives (greedy).
    assert captioned_by(decoders[0]) and captioned_by(decoders[1])
    with Client(decoders[0].address, timeout=120) as client:
        single = client.caption_full(collection / "orbit.mp4", max_new_tokens=7)
    assert by_path["orbit.mp4"]["caption"] == single.caption
    # Progress lines while running, one line per failure, a summary at the end.
    assert re.search(r"pllava-caption: \d/5: \d done, \d failed, \d skipped, [\d.]+ videos/min, "
                     r"[\d.]+ tokens/s, ETA", run.stderr), run.stderr
    assert f"error: {collection / 'sub' / 'broken.mp4'}: INVALID_ARGUMENT" in run.stderr
    assert "4 captioned, 1 failed, 0 skipped of 5" in run.stderr
    assert "1 video(s) have no caption yet" in run.stderr

    # Rerun: the four captions are skipped, the failure is tried again (and fails again).
    run = caption_cli(collection, *common)
    assert run.returncode == 1 and "0 captioned, 1 failed, 4 skipped of 5" in run.stderr, run.stderr
    lines = read_lines(out)
    assert len(lines) == 6 and lines[-1]["status"] == "error" and lines[-1]["path"].endswith("broken.mp4")
    # --no-retry-failed leaves it alone; still not everything has a caption.
    run = caption_cli(collection, *common, "--no-retry-failed")
    assert run.returncode == 1 and "0 captioned, 0 failed, 5 skipped of 5" in run.stderr, run.stderr
    assert len(read_lines(out)) == 6

    # The broken file is replaced by a video and the file ends in a torn line: the rerun
    # captions just that one and finishes with exit status 0.
    (collection / "sub" / "broken.mp4").write_bytes((collection / "short.mp4").read_bytes())
    with open(out, "ab") as f:
        f.write(b'{"path": "torn')
    run = caption_cli(collection, *common)
    assert run.returncode == 0 and "1 captioned, 0 failed, 4 skipped of 5" in run.stderr, run.stderr
    assert "1 unreadable line(s) ignored" in run.stderr
    text = out.read_text().splitlines()
    assert text[6] == '{"path": "torn' and json.loads(text[7])["status"] == "ok"
    ok = [json.loads(t)["path"] for t in text if t.startswith("{") and t.endswith("}")
          and json.loads(t)["status"] == "ok"]
    assert sorted(ok) == sorted(str(collection / rel) for rel in
                                ("orbit.mp4", "short.mp4", "still.jpg", "sub/portrait.mp4", "sub/broken.mp4"))


def test_a_killed_run_resumes_with_one_ok_line_per_video(both, videos_dir, tmp_path):
    folder = tmp_path / "copies"
    names = []
    for i in range(8):
        source = ("orbit.mp4", "short.mp4")[i % 2]
        touch(folder / f"{i}-{source}", (videos_dir / source).read_bytes())
        names.append(f"{i}-{source}")
    (tmp_path / "list.txt").write_text("".join(f"copies/{n}\n" for n in names))
    out = tmp_path / "captions.jsonl"
    argv = [console_script("pllava-caption"), tmp_path / "list.txt", "--out", out, "--server", both,
            "--max-new-tokens", 40, "--concurrency", 2]
    run = subprocess.Popen(list(map(str, argv)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while (not out.exists() or len(out.read_bytes().splitlines()) < 2) and time.monotonic() < deadline:
            assert run.poll() is None, run.stderr.read().decode()
            time.sleep(0.05)
    finally:
        run.kill()  # SIGKILL, in the middle of the collection
        run.wait()
    partial = read_lines(out)  # whole lines only
    assert 2 <= len(partial) < 8 and all(line["status"] == "ok" for line in partial)

    done = caption_cli(tmp_path / "list.txt", "--out", out, "--server", both, "--max-new-tokens", 40)
    assert done.returncode == 0, done.stderr
    assert f"{8 - len(partial)} captioned, 0 failed, {len(partial)} skipped of 8" in done.stderr
    lines = read_lines(out)
    assert sorted(line["path"] for line in lines) == sorted(str(folder / n) for n in names)
    assert all(line["status"] == "ok" for line in lines)


def test_caption_many_survives_a_decoder_going_away(tiny_model_dir, encoder, decoders, logs, videos_dir, tmp_path):
    paths = []
    for i in range(8):
        paths.append(touch(tmp_path / f"{i}.mp4", (videos_dir / "orbit.mp4").read_bytes()))
    doomed = start_small_decoder(tiny_model_dir, encoder, logs)
    try:
        with Client(f"{decoders[0].address},{doomed.address}", timeout=120) as client:
            assert client.default_concurrency() == 2 * MAX_BATCH
            results = client.caption_many(paths, max_new_tokens=60)
            first = next(results)  # results come as they finish, the others still running
            assert first.ok
            doomed.kill()  # SIGKILL: its streams break off mid-caption
            rest = list(results)
    finally:
        doomed.kill()
    everything = [first, *rest]
    assert sorted(r.path for r in everything) == sorted(map(str, paths))
    assert all(r.ok and r.num_generated_tokens == 60 for r in everything), [(r.path, r.code, r.message)
                                                                           for r in everything]
    # The calls that broke off with it were tried again on the decoder that is left (the
    # assertion above): those that had streamed tokens by caption_many (attempts > 1), those
    # that had not by the client's retry policy (attempts 1); which kinds there were depends on
    # the moment of the kill.


def test_progress_bar_on_a_terminal(both, videos_dir, tmp_path):
    out = tmp_path / "captions.jsonl"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))
    argv = [console_script("pllava-caption"), videos_dir / "orbit.mp4", videos_dir / "short.mp4", "--out", out,
            "--server", both, "--max-new-tokens", 5]
    run = subprocess.Popen(list(map(str, argv)), stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    screen = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's last writer has gone
                break
            if not chunk:
                break
            screen += chunk
        assert run.wait(timeout=120) == 0, screen.decode(errors="replace")
    finally:
        os.close(master)
        if run.poll() is None:
            run.kill()
    text = screen.decode(errors="replace")
    assert "100%|" in text and "2/2 [" in text, text  # tqdm's bar with its ETA field
    assert re.search(r"2 done, 0 failed, 0 skipped, [\d.]+ videos/min, [\d.]+ tokens/s", text), text
    assert "2 captioned, 0 failed, 0 skipped of 2" in text


def test_several_inputs_need_out_and_one_video_works_as_before(both, decoders, videos_dir):
    run = caption_cli(videos_dir, "--server", both)
    assert run.returncode == 2 and "need --out" in run.stderr
    run = caption_cli(videos_dir / "short.mp4", "--server", both, "--max-new-tokens", 4, "--json")
    assert run.returncode == 0, run.stderr
    assert len(json.loads(run.stdout)["token_ids"]) == 4
    run = caption_cli(videos_dir / "short.mp4", "--server", "127.0.0.1:1,", "--max-new-tokens", 4)
    assert run.returncode == 2 and "empty item" in run.stderr


def test_file_names_that_are_not_utf8_are_captioned_recorded_and_resumed(both, videos_dir, tmp_path):
    """Linux file names are bytes: one that is not UTF-8 is captioned (its odd bytes replaced in
    the request's name), recorded with JSON escapes that read back as the same path, and skipped
    by a rerun."""
    folder = tmp_path / "names"
    touch(folder / "plain.mp4", (videos_dir / "orbit.mp4").read_bytes())
    odd = os.fsencode(folder) + b"/caf\xe9.mp4"  # Latin-1 bytes
    with open(odd, "wb") as f:
        f.write((videos_dir / "short.mp4").read_bytes())
    out = tmp_path / "captions.jsonl"
    common = (folder, "--out", out, "--server", both, "--max-new-tokens", 3)
    run = caption_cli(*common)
    assert run.returncode == 0 and "2 captioned, 0 failed" in run.stderr, run.stderr
    lines = read_lines(out)
    assert sorted(os.fsencode(line["path"]) for line in lines) == sorted([odd, os.fsencode(folder / "plain.mp4")])
    assert all(line["status"] == "ok" and line["num_generated_tokens"] == 3 for line in lines), lines
    run = caption_cli(*common)
    assert run.returncode == 0 and "0 captioned, 0 failed, 2 skipped of 2" in run.stderr, run.stderr


def test_a_collection_run_waits_for_a_decoder_still_loading(tiny_model_dir, encoder, logs, videos_dir, tmp_path):
    """A run started while its decoder loads (it listens and answers UNAVAILABLE; compiling its
    graphs cold keeps it so for a while) asks again until the decoder serves, then captions."""
    out = tmp_path / "captions.jsonl"
    with start_decoder(tiny_model_dir, encoder.address, logs, "--compile-cache", str(tmp_path / "cold"),
                       wait_serving=False) as loading:
        run = caption_cli(videos_dir / "short.mp4", "--out", out, "--server", loading.address, "--max-new-tokens", 3,
                          "--timeout", 240)
        assert re.search(r"GetInfo -> UNAVAILABLE: the decoder is still loading", loading.log_text()), \
            "the decoder was serving already: nothing to wait for"
    assert run.returncode == 0 and "1 captioned, 0 failed" in run.stderr, run.stderr
    assert [line["status"] for line in read_lines(out)] == ["ok"]


def test_a_decoder_gone_for_good_stops_the_run_and_a_rerun_resumes(tiny_model_dir, encoder, decoders, logs,
                                                                   videos_dir, tmp_path):
    """The decoder is killed after the first caption: the run waits --wait-down-s, then stops
    with exit status 3, recording no error for the videos it could not reach (each had one
    before: a run walked the whole list at ~15 s a video, an error line each). The same
    command against a decoder that is up takes up exactly those."""
    folder = tmp_path / "videos"
    for i in range(5):
        touch(folder / f"{i}.mp4", (videos_dir / "short.mp4").read_bytes())
    out = tmp_path / "captions.jsonl"
    common = ("--out", out, "--max-new-tokens", 30, "--concurrency", 1, "--wait-down-s", 3)
    doomed = start_small_decoder(tiny_model_dir, encoder, logs)
    try:
        run = subprocess.Popen([console_script("pllava-caption"), *map(str, (folder, "--server", doomed.address,
                                                                             *common))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not out.exists() or not out.read_text().count("\n"):
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "slow"
            time.sleep(0.05)
        doomed.kill()
        stderr = ended(run)
    finally:
        doomed.kill()
    assert run.returncode == 3, stderr
    assert re.search(rf"stopped: the decoder at {re.escape(doomed.address)} answered UNAVAILABLE for \d+ s "
                     r"\(wait_down_s 3\)", stderr), stderr
    assert "run the same command again to resume" in stderr
    lines = read_lines(out)
    assert 1 <= len(lines) < 5 and all(line["status"] == "ok" for line in lines), lines

    rerun = caption_cli(folder, "--server", decoders[0].address, *common)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{5 - len(lines)} captioned, 0 failed, {len(lines)} skipped of 5" in rerun.stderr
    assert sorted(line["path"] for line in read_lines(out)) == sorted(str(folder / f"{i}.mp4") for i in range(5))


def test_sigterm_ends_a_run_as_ctrl_c_does(decoders, videos_dir, tmp_path):
    """docker stop, a scheduler's end of job: the calls are cancelled, the summary printed,
    exit status 143 (it was killed by the signal, with no summary)."""
    folder = tmp_path / "videos"
    for i in range(4):
        touch(folder / f"{i}.mp4", (videos_dir / "short.mp4").read_bytes())
    out = tmp_path / "captions.jsonl"
    run = subprocess.Popen([console_script("pllava-caption"), *map(str, (folder, "--out", out, "--server",
                                                                         decoders[0].address, "--concurrency", 1,
                                                                         "--max-new-tokens", 60))],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not out.exists() or not out.read_text().count("\n"):
        assert run.poll() is None and time.monotonic() < deadline, run.stderr.read() if run.poll() else "slow"
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    stderr = ended(run)
    assert run.returncode == 143 and "pllava-caption: interrupted: " in stderr, (run.returncode, stderr)
    assert all(line["status"] == "ok" for line in read_lines(out))


def test_failure_after_failure_stops_the_run(tiny_model_dir, decoders, logs, videos_dir, tmp_path):
    """A decoder whose encoder wants a token it lacks fails every caption (INTERNAL, naming
    the setting): after --stop-after-failures videos in a row the run stops (exit 3), the
    rest untouched; against a working decoder the same command finishes, and with other
    settings the same files are captioned anew."""
    folder = tmp_path / "videos"
    for i in range(5):
        touch(folder / f"{i}.mp4", (videos_dir / "short.mp4").read_bytes())
    out = tmp_path / "captions.jsonl"
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-the-decoder-lacks\n")
    with start_encoder(tiny_model_dir, log_dir=logs, extra_args=["--auth-token-file", str(tokens)]) as guarded, \
            start_decoder(tiny_model_dir, guarded.address, logs, "--visual-cache-bytes", "0") as broken:
        run = caption_cli(folder, "--out", out, "--server", broken.address, "--concurrency", 1, "--retries", 0,
                          "--stop-after-failures", 2, "--max-new-tokens", 3)
        assert "set encoder_token_file" in broken.log_text()  # the operator's hint (clients get an id)
    assert run.returncode == 3, run.stderr
    assert ("stopped: the last 2 videos failed one after the other, the last with INTERNAL" in run.stderr
            and "that is the service's trouble, not the videos'" in run.stderr), run.stderr
    assert [line["code"] for line in read_lines(out)] == ["INTERNAL"] * 2
    done = caption_cli(folder, "--out", out, "--server", decoders[0].address, "--max-new-tokens", 3)
    assert done.returncode == 0 and "5 captioned, 0 failed, 0 skipped of 5" in done.stderr, done.stderr
    # the same files with other settings: captioned again, the earlier captions named as not counting
    again = caption_cli(folder, "--out", out, "--server", decoders[0].address, "--max-new-tokens", 4)
    assert again.returncode == 0 and "5 captioned, 0 failed, 0 skipped of 5" in again.stderr, again.stderr
    assert "5 caption(s) made with other settings (prompt, template, limits, sampling) do not count" in again.stderr
    assert [line["settings"]["max_new_tokens"] for line in read_lines(out)] == [3] * 7 + [4] * 5


def test_a_call_stopped_between_two_pieces_gives_no_result(decoders, videos_dir, tmp_path):
    """A run stopped (Ctrl-C, or the service's trouble) while a worker's stream is between
    two pieces: the stream ends without its final event, and the worker must give nothing,
    not an "ok" result without a caption (the CLI died on it with a traceback)."""
    from pllava_client.collection import _caption_one, _Calls

    video = touch(tmp_path / "v.mp4", (videos_dir / "short.mp4").read_bytes())
    calls = _Calls(decoders[0].address)
    with Client(decoders[0].address, timeout=120) as client, futures.ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(_caption_one, client, str(video), None, {"max_new_tokens": 400}, 0, None, calls, 0)
        deadline = time.monotonic() + 120
        while not (calls._streams.get(0) and calls._streams[0].token_ids):
            assert time.monotonic() < deadline and not outcome.done(), outcome.result() if outcome.done() else "slow"
            time.sleep(0.01)
        calls.stop()
        assert outcome.result(timeout=60) is None


def test_closing_caption_many_starts_no_call_afterwards(decoders, videos_dir, tmp_path):
    """A worker still reading its file when the run is closed (a slow ``skip`` stands in for a
    large file) makes no call once it has read it: closing stops every call, not only those
    running at that moment."""
    first = touch(tmp_path / "first.mp4", (videos_dir / "short.mp4").read_bytes())
    late = touch(tmp_path / f"late-{os.getpid()}-{time.monotonic_ns()}.mp4", (videos_dir / "short.mp4").read_bytes())
    release = threading.Event()
    done_reading = threading.Event()

    def skip(path: str, digest: str) -> bool:
        if path == str(late):
            release.wait(60)  # until the run is being closed
            done_reading.set()
        return False

    with Client(decoders[0].address, timeout=120) as client:
        results = client.caption_many([first, late], concurrency=2, skip=skip, max_new_tokens=3)
        assert next(results).path == str(first)
        threading.Timer(0.5, release.set).start()  # (close() stops the run at once, then waits for its workers)
        results.close()
        assert done_reading.is_set()  # close() waited for the worker that was reading
        # A call made after the close would run to its end uncancelled: give its log line time.
        deadline = time.monotonic() + 3
        while late.name not in decoders[0].log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    assert late.name not in decoders[0].log_text(), decoders[0].log_tail()
