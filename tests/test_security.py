"""TLS, mutual TLS and bearer tokens on both hops (client -> decoder, decoder -> encoder).

Real servers on 127.0.0.1 with certificates made at run time (``pllava make-certs``'s code,
on the ``cryptography`` package): ``pllava up --secure`` turns everything on for a cluster,
and a second decoder started with the flags reaches the cluster's encoder as a client of its
own. Nothing here is a mock: every refusal is the real server's answer over real gRPC.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import generate_latest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pllava_client import CaptionError, Client
from pllava_client.channel import tls_server_name
from pllava_client.health import check_health
from pllava_client.security import ClientTls, explain_unavailable
from pllava_decoder.encoder_client import EncoderClient, EncoderError, EncoderUnavailable
from pllava_decoder.settings import DecoderSettings
from pllava_encoder.settings import EncoderSettings
from pllava_openai.settings import OpenAISettings
from pllava_serving.certs import FILES, CertFiles, make_certs
from pllava_serving.metrics import new_registry
from pllava_serving.security import (ServerSecurity, ServerTls, TokenChecker, TokenFile, bearer_token,
                                     load_tls_files, read_tokens)
from pllava_serving.server import create_server
from pllava_serving.settings import load_settings
from other_user import AS_ROOT, as_another_user, open_folder
from servers import console_script, start_decoder
from test_launcher import READY, pllava_up, read_lines

REPO = Path(__file__).resolve().parents[1]
CONTEXT = 1024  # the other server suites' context: their compiled graphs are reused
CLIENT_TOKEN = "client-token-0123456789abcdef"
ROTATING_TOKEN = "rotating-token-0123456789abcdef"


@dataclass
class SecureCluster:
    """``pllava up --secure``: its decoder and encoder addresses, its files, what it printed."""

    address: str
    encoder: str
    openai_url: str
    certs: CertFiles
    printed: str

    def client(self, **overrides) -> Client:
        options = dict(tls_ca=str(self.certs.ca), tls_cert=str(self.certs.client_cert),
                       tls_key=str(self.certs.client_key), token=self.token, timeout=120)
        options.update(overrides)
        return Client(self.address, **{k: v for k, v in options.items() if v is not None})

    @property
    def token(self) -> str:
        return self.certs.token.read_text().strip()


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("secure") / "certs"  # does not exist: pllava up makes it
    up = pllava_up("--model", tiny_model_dir, "--port", 0, "--max-context", CONTEXT, "--secure", folder,
                   "--encoder-setting", "video_workers=1", "--openai-port", 0)
    lines: queue.Queue = queue.Queue()
    stdout, stderr = [], []
    read_lines(up.stdout, lines, stdout)
    err_reader = read_lines(up.stderr, queue.Queue(), stderr)
    try:
        ready = None
        while True:
            line = lines.get(timeout=600)
            assert line is not None, "pllava up --secure ended before it was ready:\n" + "".join(stderr[-40:])
            ready = ready or READY.match(line)
            if ready and "try:" in line:
                break
        printed = "".join(stdout)
        openai_url = re.search(r"OpenAI-compatible API at (http://\S+/v1) \(plain HTTP", printed).group(1)
        yield SecureCluster(ready.group(1), ready.group(2), openai_url, CertFiles(folder), printed)
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=120)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait()
        err_reader.join(30)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# accepted by the second decoder\n{CLIENT_TOKEN}\n\n{ROTATING_TOKEN}\n")
    return path


@pytest.fixture(scope="module")
def decoder(tiny_model_dir, cluster, token_file, tmp_path_factory):
    """A decoder started with the flags: TLS without client certificates, two accepted tokens,
    and the cluster's encoder (which requires TLS, a client certificate and a token) as its
    encoder."""
    c = cluster.certs
    with start_decoder(tiny_model_dir, f"dns:///{cluster.encoder}", tmp_path_factory.mktemp("decoder-logs"),
                       "--max-context", str(CONTEXT),
                       "--tls-cert", str(c.server_cert), "--tls-key", str(c.server_key),
                       "--auth-token-file", str(token_file),
                       "--encoder-tls-ca", str(c.ca), "--encoder-tls-cert", str(c.client_cert),
                       "--encoder-tls-key", str(c.client_key), "--encoder-token-file", str(c.token),
                       tls=ClientTls.from_files(str(c.ca))) as server:
        yield server


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> CertFiles:
    """Certificates of another CA, which no server here trusts."""
    return make_certs(tmp_path_factory.mktemp("foreign") / "certs")


def caption_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(CaptionError) as err:
        call()
    return err.value.code(), err.value.details()


# ---- pllava up --secure: both hops over mutual TLS with a token --------------------------------

def test_pllava_up_secure_captions_over_mutual_tls_with_a_token(cluster, videos_dir):
    c = cluster.certs
    assert c.complete()
    for key in (c.ca_key, c.server_key, c.client_key, c.token):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key   # keys and the token: owner only
    assert stat.S_IMODE(c.folder.stat().st_mode) == 0o700
    assert "both hops use TLS with client certificates" in cluster.printed

    with cluster.client() as client:
        result = client.caption_full(videos_dir / "orbit.mp4", max_new_tokens=4)
    # The encoder did the work (not the visual cache), so the decoder -> encoder hop worked too.
    assert result.num_visual_tokens == 576 and not result.visual_tokens_cached
    assert len(result.token_ids) == 4


def api_get(cluster: SecureCluster, path: str, token: str | None = None) -> tuple[int, dict]:
    """GET ``path`` of the cluster's OpenAI front end (with ``token`` as the API key)."""
    request = urllib.request.Request(cluster.openai_url.removesuffix("/v1") + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_openai_front_end_reaches_the_secured_decoder_and_asks_for_the_token(cluster):
    # /health is 200 only when the front end's GetInfo reached the decoder (TLS, client
    # certificate, token); the API itself wants the token as its key.
    status, body = api_get(cluster, "/health")
    assert status == 200 and body["status"] == "ok"
    assert api_get(cluster, "/v1/models")[0] == 401
    assert api_get(cluster, "/v1/models", "not-the-token")[0] == 401
    status, body = api_get(cluster, "/v1/models", cluster.token)
    assert status == 200 and body["data"][0]["id"]


def test_one_rotation_of_the_shared_token_file_serves_every_hop(cluster, videos_dir):
    """The documented rotation (add the new token first, move over, remove the old) on the
    one token file of ``pllava up --secure``: the front end takes the new API key and sends
    the new token to the decoder, and the decoder sends it to the encoder, with no restart
    (the front end read its two token files once and kept refusing the new key)."""
    old, new = cluster.token, "rotated-shared-token-0123456789abcdef"

    def until(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, what
            time.sleep(0.3)

    def decoder_refuses(token: str) -> bool:
        with cluster.client(token=token) as client:
            try:
                client.info()
                return False
            except CaptionError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
                return True

    try:
        cluster.certs.token.write_text(f"{new}\n{old}\n")
        until(lambda: api_get(cluster, "/v1/models", new)[0] == 200, "the front end never took the new API key")
        cluster.certs.token.write_text(f"{new}\n")  # the old token is refused everywhere from now on
        until(lambda: decoder_refuses(old), "the decoder kept the old token")
        until(lambda: api_get(cluster, "/v1/models", old)[0] == 401, "the front end kept the old API key")
        assert api_get(cluster, "/health")[0] == 200  # the front end's GetInfo carried the new token
        with cluster.client(token=new) as client:
            result = client.caption_full(videos_dir / "short.mp4", max_new_tokens=2)
        assert result.num_visual_tokens == 576 and not result.visual_tokens_cached  # the encoder hop too
    finally:
        cluster.certs.token.write_text(f"{old}\n")
        until(lambda: api_get(cluster, "/v1/models", old)[0] == 200 and not decoder_refuses(old),
              "the original token was not restored")


def test_the_printed_command_captions(cluster, videos_dir):
    line = next(l for l in cluster.printed.splitlines() if "try:" in l)
    command = line.split("try:", 1)[1].strip().replace("VIDEO", str(videos_dir / "short.mp4"))
    assert "--tls-ca" in command and "PLLAVA_TOKEN=" in command
    env = {k: v for k, v in os.environ.items() if k != "PLLAVA_TOKEN"}
    done = subprocess.run(["bash", "-c", command.replace("pllava-caption", console_script("pllava-caption"), 1)
                           + " --max-new-tokens 3 --json"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert '"finish_reason": "length"' in done.stdout


def test_mutual_tls_refuses_clients_without_an_accepted_certificate(cluster, foreign):
    with cluster.client(tls_cert=None, tls_key=None) as client:
        code, message = caption_code(lambda: client.info(timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert "client certificate" in message and "tls_cert" in message

    with cluster.client(tls_cert=str(foreign.client_cert), tls_key=str(foreign.client_key)) as client:
        code, message = caption_code(lambda: client.info(timeout=30))
    assert code == grpc.StatusCode.UNAVAILABLE and "refused this client certificate" in message

    with cluster.client() as client:
        assert client.info(timeout=30).max_context == CONTEXT


def test_a_plaintext_client_against_tls_gets_unavailable_that_says_tls(cluster, decoder):
    for address in (cluster.address, decoder.address):
        with Client(address, token=CLIENT_TOKEN) as client:
            code, message = caption_code(lambda: client.info(timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "may require TLS" in message and "tls_ca" in message


def test_a_server_certificate_of_another_ca_is_named(cluster, foreign):
    with cluster.client(tls_ca=str(foreign.ca)) as client:
        code, message = caption_code(lambda: client.info(timeout=30))
        assert code == grpc.StatusCode.UNAVAILABLE and "not signed by the CA in tls_ca" in message
        # Waiting for such a decoder to be ready ends after three of these answers, not at its deadline.
        asked = []
        info = client.info
        client.info = lambda **kwargs: asked.append(1) or info(**kwargs)
        code, message = caption_code(lambda: client.wait_ready(3600))
    assert code == grpc.StatusCode.UNAVAILABLE and "not signed by the CA in tls_ca" in message and len(asked) == 3


def test_health_cli_over_tls(cluster):
    c = cluster.certs

    def health(*args):
        return subprocess.run([sys.executable, "-m", "pllava_client.health", cluster.address, *args],
                              capture_output=True, text=True, timeout=60)

    ok = health("--tls-ca", str(c.ca), "--tls-cert", str(c.client_cert), "--tls-key", str(c.client_key))
    assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stderr
    plain = health("--timeout", "2")
    assert plain.returncode == 1 and "TLS" in plain.stderr and "--tls-ca" in plain.stderr
    bad = health("--tls-ca", str(c.ca), "--tls-cert", str(c.client_cert))
    assert bad.returncode == 2 and "--tls-cert and --tls-key go together" in bad.stderr


# ---- tokens on the decoder started with flags -------------------------------------------------

def test_tokens_missing_or_wrong_are_unauthenticated_and_the_right_ones_work(decoder, cluster, videos_dir):
    ca = str(cluster.certs.ca)
    with Client(decoder.address, tls_ca=ca, timeout=60) as client:
        code, message = caption_code(client.info)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "requires a bearer token" in message
        code, _ = caption_code(lambda: client.caption_full(videos_dir / "short.mp4", max_new_tokens=2))
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with Client(decoder.address, tls_ca=ca, token=CLIENT_TOKEN[:-1], timeout=60) as client:
        code, message = caption_code(client.info)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "not accepted" in message
    for token in (CLIENT_TOKEN, ROTATING_TOKEN):  # every line of the file is accepted
        with Client(decoder.address, tls_ca=ca, token=token, timeout=120) as client:
            assert client.info().max_context == CONTEXT
    # The caption itself needs the decoder -> encoder hop: TLS, client certificate and token
    # given to the decoder as flags.
    with Client(decoder.address, tls_ca=ca, token=CLIENT_TOKEN, timeout=120) as client:
        result = client.caption_full(videos_dir / "orbit.mp4", max_new_tokens=3)
    assert result.num_visual_tokens == 576 and not result.visual_tokens_cached


def test_the_authorization_header_is_read_as_bearer_only(decoder, cluster):
    credentials = ClientTls.from_files(str(cluster.certs.ca)).credentials()
    with grpc.secure_channel(decoder.address, credentials) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")

        def ask(metadata):
            return list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=30))

        # Server reflection needs the token (only health is open), the scheme in any case.
        answer = ask((("authorization", f"bearer {CLIENT_TOKEN}"),))
        names = [s.name for s in answer[0].list_services_response.service]
        assert "pllava.v1.Decoder" in names
        for metadata, words in ((None, "requires a bearer token"),
                                ((("authorization", f"Basic {CLIENT_TOKEN}"),), "must be 'Bearer TOKEN'"),
                                ((("authorization", "Bearer"),), "must be 'Bearer TOKEN'")):
            with pytest.raises(grpc.RpcError) as err:
                ask(metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and words in err.value.details()

        # A method that does not exist: the same refusal, not UNIMPLEMENTED (nothing learnt).
        unknown = channel.unary_unary("/pllava.v1.Decoder/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"", timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            unknown(b"", timeout=30, metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # The refusal is logged with the method path the caller chose: escaped, it forges no line.
        forging = channel.unary_unary("/pllava.v1.Decoder/Get\nFORGED 2026 INFO all is well")
        with pytest.raises(grpc.RpcError) as err:
            forging(b"", timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        decoder.wait_for_log(r"refused /pllava\.v1\.Decoder/Get\\nFORGED 2026 INFO all is well from", timeout=30)
        assert "\nFORGED" not in decoder.log_text()


def test_health_stays_open_without_a_token(decoder, cluster):
    tls = ClientTls.from_files(str(cluster.certs.ca))
    assert check_health(decoder.address, tls=tls) == "SERVING"
    assert check_health(decoder.address, "pllava.v1.Decoder", tls=tls) == "SERVING"


def test_refusals_are_logged_without_the_token(decoder, cluster):
    wrong = "wrong-token-that-must-not-be-logged"
    with Client(decoder.address, tls_ca=str(cluster.certs.ca), token=wrong, timeout=60) as client:
        caption_code(client.info)
    decoder.wait_for_log(r"refused /pllava\.v1\.Decoder/GetInfo from \S+: UNAUTHENTICATED", timeout=30)
    assert wrong not in decoder.log_text() and CLIENT_TOKEN not in decoder.log_text()
    assert "bearer token required (2 accepted" in decoder.log_text()


def test_a_changed_token_file_is_read_again(decoder, cluster, token_file):
    ca = str(cluster.certs.ca)
    original = token_file.read_text()
    rotated = "rotated-token-0123456789abcdef"
    try:
        token_file.write_text(original.replace(ROTATING_TOKEN, rotated))
        accepted_again(decoder.address, ca, rotated)
        with Client(decoder.address, tls_ca=ca, token=ROTATING_TOKEN, timeout=30) as client:
            assert caption_code(client.info)[0] == grpc.StatusCode.UNAUTHENTICATED
        # A file that no longer reads (no token left) keeps the tokens read before.
        token_file.write_text("# nothing\n")
        deadline = time.monotonic() + 30
        with Client(decoder.address, tls_ca=ca, token=rotated, timeout=30) as client:
            while not re.search("holds no token.*keeping the 2 token", decoder.log_text()):
                assert client.info().max_context == CONTEXT
                assert time.monotonic() < deadline, "the emptied file was not noticed"
                time.sleep(0.3)
            assert client.info().max_context == CONTEXT
    finally:
        token_file.write_text(original)
        accepted_again(decoder.address, ca, ROTATING_TOKEN)


def accepted_again(address: str, ca: str, token: str, timeout: float = 30) -> None:
    """Wait until the server accepts ``token`` (its token file was just written)."""
    deadline = time.monotonic() + timeout
    with Client(address, tls_ca=ca, token=token, timeout=30) as client:
        while True:
            try:
                client.info()
                return
            except CaptionError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                assert time.monotonic() < deadline, f"{token!r} was never accepted"
                time.sleep(0.3)


def test_caption_cli_takes_tls_flags_and_pllava_token(decoder, cluster, videos_dir):
    base = [console_script("pllava-caption"), str(videos_dir / "short.mp4"), "--server", decoder.address,
            "--max-new-tokens", "2", "--json"]
    ca = ["--tls-ca", str(cluster.certs.ca)]
    env = {k: v for k, v in os.environ.items() if k != "PLLAVA_TOKEN"}

    def run(args, **extra_env):
        return subprocess.run(base + args, capture_output=True, text=True, timeout=300, env={**env, **extra_env})

    by_env = run(ca, PLLAVA_TOKEN=CLIENT_TOKEN)
    assert by_env.returncode == 0, by_env.stderr
    assert '"finish_reason": "length"' in by_env.stdout
    by_flag = run(ca + ["--token", ROTATING_TOKEN], PLLAVA_TOKEN="not-this-one")  # the flag wins
    assert by_flag.returncode == 0, by_flag.stderr

    missing = run(ca)
    assert missing.returncode == 1 and "UNAUTHENTICATED" in missing.stderr
    plaintext = run([], PLLAVA_TOKEN=CLIENT_TOKEN)
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stderr and "--tls-ca" in plaintext.stderr
    half = run(ca + ["--tls-cert", str(cluster.certs.client_cert)], PLLAVA_TOKEN=CLIENT_TOKEN)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr
    unreadable = run(["--tls-ca", str(cluster.certs.folder / "nope.pem")], PLLAVA_TOKEN=CLIENT_TOKEN)
    assert unreadable.returncode == 2 and "--tls-ca" in unreadable.stderr and "cannot be read" in unreadable.stderr


# ---- the decoder's side of the encoder hop ------------------------------------------------------

def test_the_encoder_client_names_tls_and_token_problems(cluster, videos_dir):
    c = cluster.certs
    video = (videos_dir / "short.mp4").read_bytes()
    ca_only = ClientTls.from_files(str(c.ca))
    mutual = ClientTls.from_files(str(c.ca), str(c.client_cert), str(c.client_key))

    async def encode(**options):
        client = EncoderClient(cluster.encoder, timeout_s=60, retries=0, **options)
        try:
            return await client.encode(video)
        finally:
            await client.close()

    with pytest.raises(EncoderUnavailable) as err:
        asyncio.run(encode())
    assert "may require TLS" in str(err.value) and "--encoder-tls-ca" in str(err.value)
    with pytest.raises(EncoderUnavailable) as err:
        asyncio.run(encode(tls=ca_only))
    assert "client certificate" in str(err.value) and "pass tls_cert and tls_key" in str(err.value)
    with pytest.raises(EncoderError) as err:
        asyncio.run(encode(tls=mutual))
    assert "UNAUTHENTICATED" in str(err.value) and "--encoder-token-file" in str(err.value)
    encoded = asyncio.run(encode(tls=mutual, token=lambda: cluster.token))
    assert encoded.visual.shape[0] == 576


# ---- settings and files, checked before anything loads ----------------------------------------

def test_server_settings_refuse_half_given_tls(tmp_path):
    with pytest.raises(ValueError, match="tls_cert and tls_key go together"):
        EncoderSettings(model="m", tls_cert="server.pem")
    with pytest.raises(ValueError, match="tls_client_ca .* needs TLS"):
        EncoderSettings(model="m", tls_client_ca="ca.pem")
    with pytest.raises(ValueError, match="encoder_tls_cert \\(a client certificate\\) needs encoder_tls_ca"):
        DecoderSettings(model="m", encoder_tls_cert="c.pem", encoder_tls_key="k.pem")
    with pytest.raises(ValueError, match="encoder_tls_cert and encoder_tls_key go together"):
        DecoderSettings(model="m", encoder_tls_ca="ca.pem", encoder_tls_key="k.pem")

    config = tmp_path / "decoder.yaml"
    config.write_text("model: m\ntls-cert: s.pem\ntls_key: k.pem\nauth_token_file: t\nencoder_tls_ca: ca.pem\n")
    s = load_settings(DecoderSettings, yaml_path=config, env_prefix="PLLAVA_DECODER_",
                      environ={"PLLAVA_DECODER_ENCODER_TOKEN_FILE": "et", "PLLAVA_DECODER_TLS_CLIENT_CA": "cca"})
    assert (s.tls_cert, s.tls_key, s.tls_client_ca, s.auth_token_file, s.encoder_tls_ca, s.encoder_token_file) \
        == ("s.pem", "k.pem", "cca", "t", "ca.pem", "et")


def test_servers_stop_at_start_with_one_clear_line_for_bad_files(tmp_path, tiny_model_dir, foreign):
    other = make_certs(tmp_path / "other")
    empty = tmp_path / "empty-tokens"
    empty.write_text("\n# no token here\n")

    def encoder(*args, **env):
        return subprocess.run([console_script("pllava-encoder"), "--model", str(tiny_model_dir), "--port", "0",
                               *args], capture_output=True, text=True, timeout=300,
                              env={**os.environ, **env})

    half = encoder("--tls-cert", str(foreign.server_cert))
    assert half.returncode == 2 and "tls_cert and tls_key go together" in half.stderr
    by_env = encoder(PLLAVA_ENCODER_TLS_KEY=str(foreign.server_key))
    assert by_env.returncode == 2 and "tls_cert and tls_key go together" in by_env.stderr
    missing = encoder("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(foreign.server_key))
    assert missing.returncode == 1 and "tls_cert" in missing.stderr and "cannot be read" in missing.stderr
    mismatched = encoder("--tls-cert", str(foreign.server_cert), "--tls-key", str(other.server_key))
    assert mismatched.returncode == 1 and "do not load together" in mismatched.stderr
    no_tokens = encoder("--auth-token-file", str(empty))
    assert no_tokens.returncode == 1 and "holds no token" in no_tokens.stderr
    decoder = subprocess.run([console_script("pllava-decoder"), "--model", str(tiny_model_dir), "--port", "0",
                              "--encoder", "127.0.0.1:1,127.0.0.2:1", "--encoder-tls-ca", str(foreign.ca)],
                             capture_output=True, text=True, timeout=300)
    assert decoder.returncode == 1 and "names several hosts" in decoder.stderr


def test_an_encrypted_server_key_is_refused_with_a_reason(tmp_path, foreign):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(foreign.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ValueError, match="is encrypted; the servers need an unencrypted key"):
        load_tls_files(str(foreign.server_cert), str(encrypted), None)
    with pytest.raises(ValueError, match="tls_client_ca .*not a PEM file holding a certificate"):
        load_tls_files(str(foreign.server_cert), str(foreign.server_key), str(foreign.server_key))
    assert load_tls_files(str(foreign.server_cert), str(foreign.server_key), str(foreign.ca)).client_ca


def test_a_key_this_user_cannot_read_names_both_users(foreign):
    """What a container running as another user than the owner of make-certs' keys (mode
    0600, in a folder of mode 0700) is told: its uid, the file's where it can see it, and
    the fix."""
    with open_folder("pllava-unreadable-") as folder:
        cert, key, tokens = folder / "server.pem", folder / "server-key.pem", folder / "token"
        shutil.copy(foreign.server_cert, cert)
        cert.chmod(0o644)
        shutil.copy(foreign.server_key, key)
        tokens.write_text("a-token\n")
        for path in (key, tokens):
            path.chmod(0o600 if AS_ROOT else 0o000)  # not root: the owner itself, kept out by the mode
        owner = key.stat().st_uid
        folder_modes = {0o711: f"uid {owner}", 0o700: "a user whose folder this process cannot enter"}
        for mode, belongs in folder_modes.items() if AS_ROOT else list(folder_modes.items())[:1]:
            folder.chmod(mode)
            errors = []
            with as_another_user() as me:
                for read in (lambda: load_tls_files(str(cert), str(key), None),
                             lambda: read_tokens(str(tokens))):
                    with pytest.raises(ValueError) as err:
                        read()
                    errors.append(str(err.value))
            first = "tls_key" if mode == 0o711 else "tls_cert"  # behind 0700 the certificate is out of reach too
            for message, what in zip(errors, (first, "auth_token_file")):
                assert message.startswith(f"{what} {folder}/"), message
                assert (f"this process runs as uid {me} and the file belongs to {belongs}: run as the owner "
                        "(in docker compose, PLLAVA_USER=UID:GID)") in message, message


def test_token_checker_accepts_exactly_the_listed_tokens(tmp_path):
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("x", "y")]) is None and bearer_token([("authorization", "Basic abc")]) == ""

    path = tmp_path / "tokens"
    path.write_text("first-token-0123456789\n  second-token-0123456789  \n# third-token-0123456789\n")
    assert read_tokens(str(path)) == ["first-token-0123456789", "second-token-0123456789"]
    checker = TokenChecker(TokenFile(str(path)))
    assert checker.accepts("first-token-0123456789") and checker.accepts("second-token-0123456789")
    for wrong in ("", "first-token-012345678", "first-token-01234567890", "third-token-0123456789",
                  "# third-token-0123456789", "FIRST-TOKEN-0123456789"):
        assert not checker.accepts(wrong), wrong
    path.write_text("has a space\n")
    with pytest.raises(ValueError, match="line 1: a token must be printable ASCII without spaces"):
        read_tokens(str(path))


def test_tls_lists_must_name_one_host(tmp_path, foreign):
    assert tls_server_name("ipv4:127.0.0.1:5001,127.0.0.1:5002") == "127.0.0.1"
    assert tls_server_name("localhost:5001,localhost:5002") == "localhost"
    assert tls_server_name("dns:///encoder:50051") is None and tls_server_name("localhost:1") is None
    with pytest.raises(ValueError, match="names several hosts"):
        Client("127.0.0.1:5001,127.0.0.2:5002", tls_ca=str(foreign.ca))
    with pytest.raises(ValueError, match="tls_cert needs tls_ca"):
        Client("127.0.0.1:5001", tls_cert=str(foreign.client_cert), tls_key=str(foreign.client_key))
    with pytest.raises(ValueError, match="not a PEM file holding a certificate"):
        Client("127.0.0.1:5001", tls_ca=str(foreign.client_key))
    with pytest.raises(ValueError, match="printable ASCII"):
        Client("127.0.0.1:5001", token="two words")


def test_unrelated_unavailable_errors_get_no_tls_hint():
    refused = "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Connection refused"
    assert explain_unavailable(refused, None) == refused
    assert "may require TLS" in explain_unavailable("last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", None)



class _SocketClosed(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNAVAILABLE

    def details(self):
        return "Socket closed"


def _breaking_call(events):
    yield from events
    raise _SocketClosed()


def test_a_stream_that_breaks_off_after_it_answered_gets_no_tls_hint():
    """The hint is for a transport that never worked: once the decoder has answered, a closed
    socket is the decoder going away (the kill -9 fault test sees that through real servers)."""
    from pllava_client.client import CaptionStream
    from pllava_proto.v1 import pllava_pb2

    explain = lambda details: explain_unavailable(details, None)  # noqa: E731 - what a plaintext Client uses
    token = pllava_pb2.CaptionEvent(token=pllava_pb2.TokenEvent(text="A", token_ids=[7]))
    with pytest.raises(CaptionError) as err:
        list(CaptionStream(_breaking_call([token]), explain))
    assert err.value.status == grpc.StatusCode.UNAVAILABLE and err.value.message == "Socket closed"
    with pytest.raises(CaptionError) as err:
        list(CaptionStream(_breaking_call([]), explain))
    assert "may require TLS" in err.value.message


def test_make_certs_names_the_hosts_and_refuses_to_overwrite(tmp_path):
    from cryptography import x509

    certs = make_certs(tmp_path / "c", ["localhost", "10.1.2.3", "decoder.example"])
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "decoder.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert len(certs.token.read_text().strip()) >= 40
    token = certs.token.read_text()
    with pytest.raises(FileExistsError, match="--force"):
        make_certs(tmp_path / "c")
    assert certs.token.read_text() == token
    assert make_certs(tmp_path / "c", overwrite=True).token.read_text() != token  # a new token each time
    done = subprocess.run([sys.executable, "-m", "pllava.cli", "make-certs", str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "already holds" in done.stderr


def test_make_certs_writes_through_no_planted_file_or_link(tmp_path):
    """Files someone planted in the folder under the old fixed temporary names (a world-
    writable file, a link to a file of theirs) are never written through: the keys come out
    0600 and the planted files stay as they were."""
    folder = tmp_path / "c"
    folder.mkdir()
    planted = folder / ".ca-key.pem.tmp"
    planted.write_text("planted")
    planted.chmod(0o666)
    theirs = tmp_path / "theirs.pem"
    theirs.write_text("mine")
    (folder / ".server-key.pem.tmp").symlink_to(theirs)
    certs = make_certs(folder)
    for key in (certs.ca_key, certs.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"PRIVATE KEY" in key.read_bytes(), key
    assert planted.read_text() == "planted" and theirs.read_text() == "mine"
    assert stat.S_IMODE(certs.ca.stat().st_mode) == 0o644


# ---- certificate renewal, on a real server in this process --------------------------------------

@contextlib.contextmanager
def server_in_thread(security: ServerSecurity, registry=None):
    """A real server (health and reflection only) from :func:`create_server` on 127.0.0.1, run
    on an event loop in a thread; yields its address."""
    started, box = threading.Event(), {}

    async def serve():
        box["stop"] = asyncio.Event()
        server, port, state = await create_server("127.0.0.1:0", [], security=security, registry=registry)
        await server.start()
        await state.set_serving()
        box["port"] = port
        started.set()
        await box["stop"].wait()
        await server.stop(0)

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(30)
    try:
        yield f"127.0.0.1:{box['port']}"
    finally:
        loop.call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        loop.close()


def test_a_renewed_server_certificate_is_served_without_a_restart(tmp_path):
    first = make_certs(tmp_path / "first")
    second = make_certs(tmp_path / "second")
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(first.folder / name, live / name)
    tls = ServerTls(str(live / "server.pem"), str(live / "server-key.pem"))

    with server_in_thread(ServerSecurity(tls=tls)) as target:
        def healthy_with(certs: CertFiles) -> bool:
            try:
                return check_health(target, timeout=5, tls=ClientTls.from_files(str(certs.ca)),
                                    wait_for_ready=False) == "SERVING"
            except grpc.RpcError:
                return False

        assert healthy_with(first) and not healthy_with(second)
        # A half-done renewal (a new key with the old certificate) is not served ...
        shutil.copy(second.server_key, live / "server-key.pem")
        time.sleep(1.2)
        assert healthy_with(first) and not healthy_with(second)
        # ... and once the certificate arrives too, new connections get it.
        shutil.copy(second.server_cert, live / "server.pem")
        deadline = time.monotonic() + 30
        while not healthy_with(second):
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.3)
        assert not healthy_with(first)


def test_refusals_are_counted_by_reason_with_no_method_labels(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(CLIENT_TOKEN + "\n")
    registry = new_registry()
    security = ServerSecurity(tokens=TokenChecker(TokenFile(str(tokens))))
    with server_in_thread(security, registry) as target, grpc.insecure_channel(target) as channel:
        for method, metadata in (("/grpc.reflection.v1alpha.ServerReflection/X", None),
                                 ("/made.up.Service/Method", None),
                                 ("/made.up.Service/Other", (("authorization", "Bearer nope-nope-nope"),)),
                                 ("/made.up.Service/Other", (("authorization", "Basic x"),))):
            with pytest.raises(grpc.RpcError) as err:
                channel.unary_unary(method)(b"", timeout=10, metadata=metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:  # with the token: the server's own answer
            channel.unary_unary("/made.up.Service/Method")(b"", timeout=10,
                                                           metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    counts = [registry.get_sample_value("pllava_grpc_server_unauthenticated_total", {"reason": reason})
              for reason in ("missing", "rejected", "malformed")]
    assert counts == [2, 1, 1]
    exposition = generate_latest(registry).decode()
    assert "made.up" not in exposition  # a caller without a token never names a metrics label


# ---- docker-compose: the TLS override file -------------------------------------------------------

def test_compose_tls_override_names_real_settings_and_files():
    base = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    override = yaml.safe_load((REPO / "docker-compose.tls.yml").read_text())
    assert set(override["services"]) == set(base["services"]) == {"encoder", "decoder", "openai"}
    cert_files = set(FILES) - {"ca-key.pem"}  # the CA key never goes into a container
    for name, cls, prefix in (("encoder", EncoderSettings, "PLLAVA_ENCODER_"),
                              ("decoder", DecoderSettings, "PLLAVA_DECODER_"),
                              ("openai", OpenAISettings, "PLLAVA_OPENAI_")):
        service = override["services"][name]
        env = service["environment"]
        assert any(v.endswith(":/certs:ro") for v in service["volumes"])
        for value in env.values():
            assert Path(value).parent == Path("/certs") and Path(value).name in cert_files, value
        # The servers' own loader accepts every variable; client CAs and tokens are on everywhere.
        settings = load_settings(cls, env_prefix=prefix,
                                 environ={**env, **({} if cls is OpenAISettings else {prefix + "MODEL": "/model"})})
        assert settings.auth_token_file == "/certs/token"
        if cls is OpenAISettings:  # plain HTTP itself, a TLS client of the decoder
            assert settings.decoder_tls_ca and settings.decoder_tls_cert and settings.decoder_token_file
            assert "healthcheck" not in service  # /health over HTTP, as in the base file
            continue
        assert settings.tls_cert and settings.tls_key and settings.tls_client_ca
        if cls is DecoderSettings:
            assert settings.encoder_tls_ca and settings.encoder_tls_cert and settings.encoder_token_file
        # The health check speaks TLS with a client certificate, to a name the certificate has.
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "pllava_client.health"]
        assert test[4].startswith("127.0.0.1:")
        flags = dict(zip(test[5::2], test[6::2]))
        assert {flags["--tls-ca"], flags["--tls-cert"], flags["--tls-key"]} == {
            "/certs/ca.pem", "/certs/client.pem", "/certs/client-key.pem"}
