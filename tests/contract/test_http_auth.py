"""HTTP access control against a real `edged serve`: bearer tokens with scopes,
open health, TLS, mutual TLS, and the refusal to listen openly off loopback."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from edged.auth import check_exposure, parse_tokens
from edged.config import load_config
from edged.errors import ConfigError
from tests.helpers import http, start_daemon

INFER_TOKEN = "infer-token-0123456789abcdef"
ADMIN_TOKEN = "admin-token-0123456789abcdef"
MODEL = "digits-onnx"
INFER_BODY = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}]}
CONTROL = [  # (method, path, body): everything that changes what the device serves
    ("POST", f"/v2/repository/models/{MODEL}/load", {}),
    ("POST", f"/v2/repository/models/{MODEL}/unload", {}),
    ("POST", f"/v2/repository/models/{MODEL}/rollback", {}),
    ("POST", "/v2/ota/update", {"model": MODEL, "version": "0.0.1", "url": "http://127.0.0.1:1/x.tar.gz"}),
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/ota/status", None),
]


# -- certificates ------------------------------------------------------------------
def _name(common: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, issuer_key, issuer_name, key, ca: bool, sans=None, client: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if not ca:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert=None, key=None) -> Path:
    from cryptography.hazmat.primitives import serialization

    data = b""
    if cert is not None:
        data += cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        data += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
    path.write_bytes(data)
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate from
    the CA, and a client certificate from another CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path_factory.mktemp("pki")
    ca_key, rogue_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _issue("edged test CA", ca_key, None, ca_key, ca=True)
    rogue = _issue("rogue CA", rogue_key, None, rogue_key, ca=True)
    server_key, client_key, rogue_client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    sans = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    server = _issue("edged", ca_key, ca.subject, server_key, ca=False, sans=sans)
    client = _issue("client", ca_key, ca.subject, client_key, ca=False, client=True)
    rogue_client = _issue("client", rogue_key, rogue.subject, rogue_client_key, ca=False, client=True)
    return {
        "ca": _write(root / "ca.pem", ca),
        "cert": _write(root / "server.pem", server),
        "key": _write(root / "server.key", key=server_key),
        "client_cert": _write(root / "client.pem", client),
        "client_key": _write(root / "client.key", key=client_key),
        "rogue_cert": _write(root / "rogue.pem", rogue_client),
        "rogue_key": _write(root / "rogue.key", key=rogue_client_key),
    }


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(f"# scope token\ninfer {INFER_TOKEN}\n\nadmin  {ADMIN_TOKEN}\n")
    path.chmod(0o600)
    return path


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call(url: str, method: str, path: str, body=None, headers=None, context=None) -> tuple[int, dict, dict]:
    raw = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    request = urllib.request.Request(url + path, data=raw, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            return resp.status, json.loads(resp.read() or b"{}"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}"), dict(exc.headers)


def wait_tls_ready(daemon, context: ssl.SSLContext, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not daemon.alive():
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}:\n{daemon.logs()}")
        try:
            if call(f"https://127.0.0.1:{daemon.port}", "GET", "/v2/health/ready", context=context)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"TLS daemon not ready after {timeout}s:\n{daemon.logs()}")


# -- tokens on loopback --------------------------------------------------------------
@pytest.fixture(scope="module")
def daemon(demo_bundles, tokens_file, tmp_path_factory):
    proc = start_daemon(tmp_path_factory.mktemp("auth"), demo_bundles,
                        env={"EDGED_HTTP_TOKENS_FILE": str(tokens_file), "EDGED_LOAD": MODEL})
    yield proc
    assert proc.stop() == 0, proc.logs()


def test_health_and_metadata_stay_open(daemon):
    for path in ("/v2/health/live", "/v2/health/ready", "/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready"):
        status, _, _ = call(daemon.url, "GET", path)
        assert status == 200, path


def test_inference_needs_a_token(daemon):
    status, body, headers = call(daemon.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY)
    assert status == 401 and body["code"] == "unauthorized" and "Bearer" in body["error"], body
    assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    status, body, _ = call(daemon.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, bearer("not-a-token-at-all-0000"))
    assert status == 401 and body["code"] == "unauthorized", body
    status, body, _ = call(daemon.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, {"Authorization": INFER_TOKEN})
    assert status == 401, body  # no "Bearer" scheme
    for token in (INFER_TOKEN, ADMIN_TOKEN):
        status, body, _ = call(daemon.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, bearer(token))
        assert status == 200 and body["outputs"][0]["shape"] == [1, 10], body


@pytest.mark.parametrize("method,path,body", CONTROL, ids=[c[1] for c in CONTROL])
def test_control_needs_admin(daemon, method, path, body):
    """Defect 1: anyone who reached the port could load, unload, roll back and update."""
    status, reply, _ = call(daemon.url, method, path, body)
    assert status == 401 and reply["code"] == "unauthorized", reply
    status, reply, _ = call(daemon.url, method, path, body, bearer(INFER_TOKEN))
    assert status == 403 and reply["code"] == "forbidden" and "admin" in reply["error"], reply


def test_admin_token_may_control(daemon):
    status, rows, _ = call(daemon.url, "POST", "/v2/repository/index", {}, bearer(ADMIN_TOKEN))
    assert status == 200 and {r["name"] for r in rows} >= {MODEL}
    assert call(daemon.url, "POST", f"/v2/repository/models/{MODEL}/load", {}, bearer(ADMIN_TOKEN))[0] == 200
    status, _, _ = call(daemon.url, "GET", "/v2/ota/status", None, bearer(ADMIN_TOKEN))
    assert status not in (401, 403)
    assert daemon.alive()


def test_cli_sends_edged_token(daemon):
    """`edged models list` reaches a daemon with tokens through $EDGED_TOKEN, and says 401 without it."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "edged.cli", "models", "list", "--url", daemon.url]
    env = {k: v for k, v in os.environ.items() if k != "EDGED_TOKEN"}
    refused = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert refused.returncode != 0 and "401" in refused.stderr, refused.stdout + refused.stderr
    listed = subprocess.run(args, capture_output=True, text=True, timeout=120, env={**env, "EDGED_TOKEN": ADMIN_TOKEN})
    assert listed.returncode == 0 and MODEL in listed.stdout, listed.stdout + listed.stderr


def test_unknown_paths_need_a_token(daemon):
    status, body, _ = call(daemon.url, "GET", "/v2/nothing-here")
    assert status == 401 and body["code"] == "unauthorized"
    assert call(daemon.url, "GET", "/v2/nothing-here", None, bearer(INFER_TOKEN))[0] == 404


def test_refusals_are_counted(daemon):
    call(daemon.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY)
    _, raw, _ = http("GET", daemon.url + "/metrics")
    text = raw.decode()
    assert 'edged_http_refused_total{reason="unauthorized"}' in text
    assert 'edged_http_refused_total{reason="forbidden"}' in text


def test_tritonclient_with_token_headers(daemon, demo_bundles):
    client = triton.InferenceServerClient(f"127.0.0.1:{daemon.port}")
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    with pytest.raises(InferenceServerException) as refused:
        client.infer(MODEL, [inp])
    assert "401" in str(refused.value.status()) or "token" in str(refused.value)
    result = client.infer(MODEL, [inp], headers=bearer(INFER_TOKEN))
    assert result.as_numpy("logits").shape == (1, 10)
    assert client.is_server_live()  # health needs no headers
    with pytest.raises(InferenceServerException):
        client.unload_model(MODEL, headers=bearer(INFER_TOKEN))
    client.close()


def test_tokens_file_is_read_again_when_it_changes(demo_bundles, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"admin {ADMIN_TOKEN}\n")
    tokens.chmod(0o600)
    proc = start_daemon(tmp_path / "d", demo_bundles, env={"EDGED_HTTP_TOKENS_FILE": str(tokens), "EDGED_LOAD": MODEL})
    try:
        url = proc.url + f"/v2/models/{MODEL}/infer"
        assert call(proc.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, bearer(INFER_TOKEN))[0] == 401
        tokens.write_text(f"admin {ADMIN_TOKEN}\ninfer {INFER_TOKEN}\n")
        deadline = time.monotonic() + 30
        while call(proc.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, bearer(INFER_TOKEN))[0] != 200:
            assert time.monotonic() < deadline, f"new token never accepted at {url}:\n{proc.logs()}"
            time.sleep(0.2)
    finally:
        proc.stop()


def test_public_health_off_needs_any_token(demo_bundles, tokens_file, tmp_path):
    proc = start_daemon(tmp_path, demo_bundles, wait=False, env={
        "EDGED_HTTP_TOKENS_FILE": str(tokens_file), "EDGED_HTTP_PUBLIC_HEALTH": "false", "EDGED_LOAD": MODEL})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if call(proc.url, "GET", "/v2/health/ready", None, bearer(INFER_TOKEN))[0] == 200:
                    break
            except OSError:
                pass
            assert proc.alive() and time.monotonic() < deadline, proc.logs()
            time.sleep(0.2)
        for path in ("/v2/health/live", "/v2", f"/v2/models/{MODEL}", "/metrics"):
            status, body, _ = call(proc.url, "GET", path)
            assert status == 401 and body["code"] == "unauthorized", path
        assert call(proc.url, "GET", "/v2/health/live", None, bearer(INFER_TOKEN))[0] == 200
    finally:
        proc.stop()


def test_bad_tokens_file_is_one_error_line(demo_bundles, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"root {ADMIN_TOKEN}\n")
    proc = start_daemon(tmp_path, demo_bundles, wait=False, env={"EDGED_HTTP_TOKENS_FILE": str(tokens)})
    assert proc.proc.wait(60) != 0
    logs = proc.logs()
    assert "unknown scope 'root'" in logs and ADMIN_TOKEN not in logs and "Traceback" not in logs, logs


# -- TLS and mutual TLS ------------------------------------------------------------
def _tls_daemon(tmp: Path, demo_bundles, pki, tokens_file, mutual: bool):
    env = {"EDGED_HTTP_TLS_CERT_FILE": str(pki["cert"]), "EDGED_HTTP_TLS_KEY_FILE": str(pki["key"]),
           "EDGED_HTTP_TOKENS_FILE": str(tokens_file), "EDGED_LOAD": MODEL}
    if mutual:
        env["EDGED_HTTP_TLS_CLIENT_CA_FILE"] = str(pki["ca"])
    return start_daemon(tmp, demo_bundles, env=env, wait=False)


def client_context(pki, cert: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if cert:
        context.load_cert_chain(str(pki[f"{cert}_cert"]), str(pki[f"{cert}_key"]))
    return context


@pytest.fixture(scope="module")
def tls_daemon(demo_bundles, pki, tokens_file, tmp_path_factory):
    proc = _tls_daemon(tmp_path_factory.mktemp("tls"), demo_bundles, pki, tokens_file, mutual=False)
    wait_tls_ready(proc, client_context(pki))
    yield proc
    assert proc.stop() == 0, proc.logs()


def test_tls_serves_https_only(tls_daemon, pki):
    url = f"https://127.0.0.1:{tls_daemon.port}"
    status, body, _ = call(url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, bearer(INFER_TOKEN), client_context(pki))
    assert status == 200 and body["outputs"][0]["shape"] == [1, 10]
    with pytest.raises(OSError):  # plain HTTP to the TLS port gets no HTTP answer
        http("GET", f"http://127.0.0.1:{tls_daemon.port}/v2/health/live", timeout=10)
    with pytest.raises(urllib.error.URLError):  # a client that does not trust the CA refuses it
        call(url, "GET", "/v2/health/live", context=ssl.create_default_context())


def test_tritonclient_over_tls_with_token(tls_daemon, pki):
    client = triton.InferenceServerClient(f"127.0.0.1:{tls_daemon.port}", ssl=True, ssl_options={"ca_certs": str(pki["ca"])})
    assert client.is_server_live()
    x = np.full((1, 1, 8, 8), 0.5, np.float32)
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=False)
    result = client.infer(MODEL, [inp], headers=bearer(INFER_TOKEN))
    assert result.as_numpy("logits").shape == (1, 10)
    client.close()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(demo_bundles, pki, tokens_file, tmp_path):
    proc = _tls_daemon(tmp_path, demo_bundles, pki, tokens_file, mutual=True)
    try:
        wait_tls_ready(proc, client_context(pki, "client"))
        url = f"https://127.0.0.1:{proc.port}"
        for context in (client_context(pki), client_context(pki, "rogue")):
            with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
                call(url, "GET", "/v2/health/live", context=context)
        status, body, _ = call(url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY, bearer(INFER_TOKEN),
                               client_context(pki, "client"))
        assert status == 200, body
        client = triton.InferenceServerClient(f"127.0.0.1:{proc.port}", ssl=True, ssl_options={
            "ca_certs": str(pki["ca"]), "certfile": str(pki["client_cert"]), "keyfile": str(pki["client_key"])})
        inp = triton.InferInput("input", [1, 1, 8, 8], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 1, 8, 8), np.float32))
        assert client.infer(MODEL, [inp], headers=bearer(INFER_TOKEN)).as_numpy("logits").shape == (1, 10)
        client.close()
    finally:
        assert proc.stop() == 0, proc.logs()
    assert proc.alive() is False


# -- where the daemon may listen -------------------------------------------------------
def test_non_loopback_without_tls_and_tokens_is_refused(demo_bundles, tmp_path):
    proc = start_daemon(tmp_path, demo_bundles, wait=False, env={"EDGED_HTTP_HOST": "0.0.0.0"})
    assert proc.proc.wait(60) == 2
    logs = proc.logs()
    assert "error:" in logs and "not a loopback address" in logs and "allow_insecure" in logs, logs
    assert "Traceback" not in logs


@pytest.mark.parametrize("host,tls,tokens,insecure,refused", [
    ("0.0.0.0", False, False, False, "TLS (http.tls_cert_file, http.tls_key_file) and tokens"),
    ("::", False, True, False, "needs TLS"),
    ("192.168.1.5", True, False, False, "needs tokens"),
    ("edge.example.org", True, False, False, "needs tokens"),
    ("0.0.0.0", False, False, True, None),
    ("0.0.0.0", True, True, False, None),
    ("127.0.0.1", False, False, False, None),
    ("127.0.0.2", False, False, False, None),
    ("::1", False, False, False, None),
    ("localhost", False, False, False, None),
])
def test_listen_policy(host, tls, tokens, insecure, refused):
    why = check_exposure(host, tls, tokens, insecure)
    if refused is None:
        assert why is None
    else:
        assert refused in why and "allow_insecure" in why


def test_config_checks_tls_keys_and_files(pki, tokens_file, tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        load_config(None, {"EDGED_HTTP_TLS_CERT_FILE": str(pki["cert"])})
    with pytest.raises(ConfigError, match="mutual TLS"):
        load_config(None, {"EDGED_HTTP_TLS_CLIENT_CA_FILE": str(pki["ca"])})
    with pytest.raises(ConfigError, match="cannot load"):
        load_config(None, {"EDGED_HTTP_TLS_CERT_FILE": str(pki["ca"]), "EDGED_HTTP_TLS_KEY_FILE": str(pki["key"])})
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(None, {"EDGED_HTTP_TOKENS_FILE": str(tmp_path / "missing")})
    config = load_config(None, {"EDGED_HTTP_HOST": "0.0.0.0", "EDGED_HTTP_TOKENS_FILE": str(tokens_file),
                                "EDGED_HTTP_TLS_CERT_FILE": str(pki["cert"]), "EDGED_HTTP_TLS_KEY_FILE": str(pki["key"]),
                                "EDGED_HTTP_TLS_CLIENT_CA_FILE": str(pki["ca"])})
    assert config.http.host == "0.0.0.0"


def test_tokens_file_format():
    tokens = parse_tokens(f"# c\n\ninfer {INFER_TOKEN}\nadmin {ADMIN_TOKEN}  \n", "t")
    assert sorted(tokens.values()) == ["admin", "infer"]
    for text, message in ((f"infer {INFER_TOKEN} extra", "expected 'SCOPE TOKEN'"), ("admin short", "shorter than"),
                          (f"{INFER_TOKEN} infer", "unknown scope"), ("# nothing\n", "no tokens")):
        with pytest.raises(ConfigError, match=message) as error:
            parse_tokens(text, "t")
        assert INFER_TOKEN not in str(error.value)


def test_allow_insecure_listens_on_every_address(demo_bundles, tmp_path):
    proc = start_daemon(tmp_path, demo_bundles, env={"EDGED_HTTP_HOST": "0.0.0.0", "EDGED_HTTP_ALLOW_INSECURE": "true",
                                                     "EDGED_LOAD": MODEL})
    try:
        assert call(proc.url, "POST", f"/v2/models/{MODEL}/infer", INFER_BODY)[0] == 200
    finally:
        assert proc.stop() == 0, proc.logs()


def test_cli_status_line_has_no_token(demo_bundles, tokens_file, tmp_path):
    """The start-up log names the tokens file, never a token."""
    proc = start_daemon(tmp_path, demo_bundles, env={"EDGED_HTTP_TOKENS_FILE": str(tokens_file), "EDGED_LOAD": MODEL})
    try:
        logs = proc.logs()
        assert str(tokens_file) in logs and INFER_TOKEN not in logs and ADMIN_TOKEN not in logs
    finally:
        proc.stop()
