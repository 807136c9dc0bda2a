"""The teacher server and its client over real HTTP on loopback (``opdkit serve-teacher`` in a child process).

Signals equal the local teacher's bit for bit; bad requests get a 4xx and the server keeps serving; the
client rides through a restart; 16 concurrent clients x 50 requests; a server restarted with another
teacher is refused.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from opdkit.errors import InputError
from opdkit.teacher import LocalTeacher
from opdkit.teacher.remote import RemoteTeacher, TeacherServerError
from opdkit.teacher.wire import ScoreParams, decode_signal, encode_request
from tests.teacher.serving import served, stop
from tests.teacher.test_local_teacher import make_batch

FIELDS = ("support_ids_B_T_K", "teacher_logprobs_B_T_K", "sampled_logprobs_B_T", "logsumexp_B_T")


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dirs):
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="module")
def server(teacher_dir):
    with served(teacher_dir, "--max-request-mb", "1", "--max-sequences", "32", "--max-top-k", "64") as (url, _):
        yield url


def _vocab(teacher_dir) -> int:
    from opdkit.hf import load_causal_lm
    from opdkit.modeling import vocab_rows

    return vocab_rows(load_causal_lm(teacher_dir))


def _assert_same(a, b):
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.shape == y.shape and x.dtype == y.dtype, f
        assert torch.equal(x, y), f


@pytest.mark.parametrize(
    "kw",
    [
        {"support": "teacher_topk", "top_k": 5},
        {"support": "teacher_topk", "top_k": 7, "temperature": 0.7, "drop_ids": (3, 4, 5)},
        {"support": "teacher_topk_plus_sampled", "top_k": 4},
        {"support": "student_topk", "top_k": 6},
        {"support": "full", "top_k": 1},
    ],
    ids=["topk", "topk-temp-drop", "plus-sampled", "student-topk", "full"],
)
def test_remote_signal_equals_the_local_teacher(server, teacher_dir, kw):
    V = _vocab(teacher_dir)
    remote = RemoteTeacher(server, student_vocab_size=V - 3, **kw)
    local = LocalTeacher.from_pretrained(teacher_dir, student_vocab_size=V - 3, **kw)
    batch = make_batch(V - 3)
    sup = None
    if kw["support"] == "student_topk":
        sup = torch.randint(0, V - 3, (*batch.sampled_ids_B_T.shape, 6), generator=torch.Generator().manual_seed(1))
    _assert_same(remote.score(batch, student_support_ids_B_T_K=sup),
                 local.score(batch, student_support_ids_B_T_K=sup))


def test_remote_teacher_own_chat_template(server, teacher_dir):
    V = _vocab(teacher_dir)
    batch = make_batch(V)
    msgs = [[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(batch.batch_size)]
    remote, local = RemoteTeacher(server, top_k=5), LocalTeacher.from_pretrained(teacher_dir, top_k=5)
    _assert_same(remote.score(batch, messages=msgs), local.score(batch, messages=msgs))


def test_health_tokenizer_and_schema(server, teacher_dir):
    from opdkit.hf import load_tokenizer, model_dir_digest

    remote = RemoteTeacher(server, top_k=5)
    h = remote.info
    assert h["status"] == "ok" and h["vocab_size"] == _vocab(teacher_dir) == remote.vocab_size
    assert h["model_sha256"] == model_dir_digest(teacher_dir) and h["limits"]["max_sequences"] == 32
    tok = load_tokenizer(teacher_dir)
    assert remote.tokenizer.get_vocab() == tok.get_vocab()
    assert remote.tokenizer.chat_template == tok.chat_template and h["tokenizer_vocab_size"] == len(tok)
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/health", "/v1/score", "/v1/tokenizer"} <= set(schema["paths"])
    assert "application/octet-stream" in schema["paths"]["/v1/score"]["post"]["requestBody"]["content"]


def _post(url, body, **headers):
    return httpx.post(f"{url}/v1/score", content=body, headers={"content-type": "application/octet-stream", **headers},
                      timeout=60)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, teacher_dir):
    from safetensors.torch import save

    V = _vocab(teacher_dir)
    batch = make_batch(V)
    good = encode_request(batch, ScoreParams(top_k=5))
    p = ScoreParams(top_k=5)
    cases = {
        "garbage": (b"\x00" * 3 + b"not safetensors at all", 400, "safetensors"),
        "huge header length": ((10**12).to_bytes(8, "little") + b"{}", 400, "header length"),
        "no params": (save({"input_ids": torch.zeros(1, 2, dtype=torch.int32)}), 400, "wire format"),
        "id out of range": (encode_request(make_batch(V + 50, seed=3), p), 400, "ids at attended positions"),
        "infinite temperature": (encode_request(batch, ScoreParams(top_k=5, temperature=float("inf"))), 400,
                                 "temperature"),
        "huge drop id": (encode_request(batch, ScoreParams(top_k=5, drop_ids=(10**30,))), 400, "drop_ids"),
        "bad messages": (encode_request(batch, p, messages=["hi"] * batch.batch_size), 400, "params.messages"),
        "float ids": (save({"input_ids": torch.zeros(2, 3), "attention_mask": torch.zeros(2, 3, dtype=torch.uint8),
                            "response_mask": torch.zeros(2, 1, dtype=torch.uint8),
                            "sampled_ids": torch.zeros(2, 1, dtype=torch.int32)},
                           metadata={"opdkit.wire": "1", "params": '{"prompt_len": 2, "support": "teacher_topk", '
                                     '"top_k": 5, "temperature": 1.0}'}), 400, "integer tensor"),
        "bad support": (encode_request(batch, ScoreParams(support="bogus", top_k=5)), 400, "support"),
        "bad temperature": (encode_request(batch, ScoreParams(top_k=5, temperature=-1.0)), 400, "temperature"),
        "K over the limit": (encode_request(batch, ScoreParams(top_k=65)), 413, "--max-top-k"),
        "too many sequences": (encode_request(make_batch(V, prompt_lens=(2,) * 33, resp_lens=(2,) * 33), p), 413,
                               "33 sequences"),
        "body over 1 MiB": (good + b"\x00" * (1 << 20), 413, "request body"),
    }
    for name, (body, status, words) in cases.items():
        r = _post(server, body)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert words in r.json()["error"], (name, r.json())
    # a GET where a POST belongs, a JSON body: still 4xx
    assert httpx.get(f"{server}/v1/score").status_code == 405
    assert _post(server, b'{"input_ids": [[1, 2]]}').status_code == 400
    # and the server still answers correctly
    r = _post(server, good)
    assert r.status_code == 200
    _assert_same(decode_signal(r.content, batch.response_mask_B_T), LocalTeacher.from_pretrained(teacher_dir,
                                                                                                 top_k=5).score(batch))


def test_bearer_token(tmp_path, teacher_dir):
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    V = _vocab(teacher_dir)
    batch = make_batch(V)
    with served(teacher_dir, "--token-file", str(token)) as (url, _):
        body = encode_request(batch, ScoreParams(top_k=5))
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic s3cret-token"}):
            r = _post(url, body, **headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(f"{url}/health").status_code == 401
        assert httpx.get(f"{url}/openapi.json").status_code == 200  # the schema is public
        with pytest.raises(TeacherServerError, match="teacher.token_file: .*refused the request \\(401"):
            RemoteTeacher(url, top_k=5, retries=0)
        remote = RemoteTeacher(url, top_k=5, token="s3cret-token")
        _assert_same(remote.score(batch), LocalTeacher.from_pretrained(teacher_dir, top_k=5).score(batch))


def test_client_rides_through_a_server_restart(tmp_path, teacher_dir):
    V = _vocab(teacher_dir)
    batch = make_batch(V)
    reference = LocalTeacher.from_pretrained(teacher_dir, top_k=5).score(batch)
    with served(teacher_dir) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        remote = RemoteTeacher(url, top_k=5, retries=10, backoff_s=0.25)
        _assert_same(remote.score(batch), reference)
        stop(proc)  # the server goes away; the next step's request starts while it is down
        result: dict = {}
        worker = threading.Thread(target=lambda: result.setdefault("sig", remote.score(batch)))
        worker.start()
        time.sleep(1.0)
        assert worker.is_alive() and "sig" not in result  # waiting, retrying
        with served(teacher_dir, port=port):
            worker.join(timeout=120)
        assert not worker.is_alive()
        _assert_same(result["sig"], reference)


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(TeacherServerError, match=r"did not answer after 3 tries .*is it running\?"):
        RemoteTeacher("http://127.0.0.1:9", retries=2, backoff_s=0.01)


def test_a_server_restarted_with_another_teacher_is_refused(tmp_path, tiny_model_dirs, tiny_tokenizer):
    from opdkit.tiny import build_tiny_model, save_model_dir, train_tokenizer
    from tests.tiny_models import corpus

    batch = make_batch(200)
    same_tok = save_model_dir(build_tiny_model(tiny_tokenizer, arch="llama", seed=7), tiny_tokenizer, tmp_path / "w")
    tok = train_tokenizer(corpus(seed=1) + ["another tokenizer"], vocab_size=300)
    other_tok = save_model_dir(build_tiny_model(tok, arch="llama", seed=5), tok, tmp_path / "t")
    with served(tiny_model_dirs["llama"]) as (url, proc):
        port = int(url.rsplit(":", 1)[1])
        remote = RemoteTeacher(url, top_k=5, backoff_s=0.1)
        remote.score(batch)
        stop(proc)
        # the same tokenizer, other weights; then another tokenizer: each behind the same address
        for other, words in ((same_tok, "model_sha256"), (other_tok, "model_sha256|tokenizer_sha256")):
            with served(other, port=port):
                with pytest.raises(TeacherServerError, match=f"({words}).*another teacher|another teacher.*({words})"):
                    remote.score(batch)


def test_one_bad_request_among_concurrent_ones_fails_alone(server, teacher_dir):
    V = _vocab(teacher_dir)
    good = make_batch(V)
    bad = make_batch(V)
    bad.input_ids_B_L[0, -3] = V + 7  # a prompt id past the vocabulary, at an attended position
    bodies = [encode_request(good, ScoreParams(top_k=5))] * 12 + [encode_request(bad, ScoreParams(top_k=5))] * 4
    results: dict = {}

    def post(i):
        results[i] = _post(server, bodies[i]).status_code

    for _ in range(3):  # sent together, so that the server merges them
        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(12)] == [200] * 12
        assert [results[i] for i in range(12, 16)] == [400] * 4


def test_client_splits_batches_and_checks_limits_at_connect(server, teacher_dir):
    V = _vocab(teacher_dir)
    big = make_batch(V, prompt_lens=tuple(1 + i % 6 for i in range(40)), resp_lens=tuple(i % 5 for i in range(40)))
    remote = RemoteTeacher(server, top_k=5)  # the module's server takes at most 32 sequences per request
    _assert_same(remote.score(big), LocalTeacher.from_pretrained(teacher_dir, top_k=5).score(big))
    with pytest.raises(TeacherServerError, match="objective.top_k=65: .*at most K = 64 .*--max-top-k 65"):
        RemoteTeacher(server, top_k=65)
    with pytest.raises(TeacherServerError, match="rollout.max_new_tokens = 40000 tokens .*--max-seq-len"):
        remote.check_sequence_length(40000, keys="rollout.max_new_tokens")


def test_a_read_timeout_is_not_retried(server, teacher_dir):
    V = _vocab(teacher_dir)
    big = make_batch(V, prompt_lens=(30,) * 32, resp_lens=(60,) * 32)
    remote = RemoteTeacher(server, top_k=5, retries=3)
    remote._client.timeout = httpx.Timeout(0.001)  # connected; now a request the server cannot answer in time
    before = httpx.get(f"{server}/health").json()["stats"]["requests"]
    with pytest.raises(TeacherServerError, match="teacher.timeout_s: .*did not answer within 0.001 s"):
        remote.score(big)
    time.sleep(2.0)
    assert httpx.get(f"{server}/health").json()["stats"]["requests"] - before <= 1  # sent once, not 4 times


def test_sixteen_concurrent_clients(teacher_dir):
    """16 clients x 50 requests (mixed batch shapes, the same settings): no error, every answer right, and
    the server merged concurrent requests into shared model calls."""
    V = _vocab(teacher_dir)
    full = LocalTeacher.from_pretrained(teacher_dir, support="full")
    batches = [make_batch(V, prompt_lens=(1 + i % 5, 3), resp_lens=(2 + i % 4, 1 + i % 3), seed=i) for i in range(8)]
    refs = [full.score(b).teacher_logprobs_B_T_K for b in batches]
    errors: list = []
    done = [0] * 16
    with served(teacher_dir, "--batch-sequences", "9") as (url, _):
        def client(c):
            try:
                remote = RemoteTeacher(url, top_k=5)
                for i in range(50):
                    j = (c + i) % len(batches)
                    sig = remote.score(batches[j])
                    m = batches[j].response_mask_B_T.bool()
                    # values equal the teacher's full log-probs at the returned ids; ids are the top 5 (up to
                    # float rounding: merged batches are padded differently)
                    at_ids = refs[j].gather(-1, sig.support_ids_B_T_K)[m]
                    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m], at_ids, rtol=0, atol=2e-5)
                    top = refs[j].topk(5, dim=-1).values[m]
                    torch.testing.assert_close(sig.teacher_logprobs_B_T_K[m], top, rtol=0, atol=2e-5)
                    done[c] += 1
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(f"client {c}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        stats = httpx.get(f"{url}/health").json()["stats"]
    assert not errors, errors[:3]
    assert done == [50] * 16
    assert stats["requests"] == 800
    assert stats["merged_requests"] > 0 and stats["model_calls"] < 800, stats
    assert 2 < stats["largest_call_sequences"] <= 9, stats  # requests of 2 sequences merged, never past the bound


def test_client_refuses_bad_arguments(server):
    with pytest.raises(InputError, match="support: expected one of"):
        RemoteTeacher(server, support="nope")
    remote = RemoteTeacher(server, top_k=5)
    with pytest.raises(InputError, match="student_support_ids_B_T_K"):
        remote.score(make_batch(100), student_support_ids_B_T_K=torch.zeros(4, 7, 3, dtype=torch.long))


def test_token_files_are_checked(tmp_path):
    from opdkit.errors import OpdkitError
    from opdkit.teacher.server import read_token_file

    for text, words in (("", "an empty file"), ("two words", "other characters"), ("tökén", "other characters")):
        (tmp_path / "t").write_text(text)
        with pytest.raises(OpdkitError, match=f"teacher.token_file: .*printable ASCII.*{words}"):
            read_token_file(tmp_path / "t", key="teacher.token_file")
    with pytest.raises(OpdkitError, match="cannot read"):
        read_token_file(tmp_path / "missing", key="--token-file")


def test_a_server_that_is_not_opdkits_is_named():
    """A plain HTTP server whose /health answers 200 without opdkit's JSON (as vLLM's does)."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    class NotFound(Handler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.send_header("content-type", "text/html")
            self.end_headers()
            self.wfile.write(b"<!DOCTYPE HTML><html>nope</html>")

    from opdkit.teacher.connect import detect_api

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), h) for h in (Handler, NotFound)]
    for httpd in servers:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{servers[0].server_address[1]}"
        with pytest.raises(TeacherServerError, match="is not an opdkit teacher server.*teacher.api=openai"):
            RemoteTeacher(url, top_k=5, retries=0)
        url404 = f"http://127.0.0.1:{servers[1].server_address[1]}"
        with pytest.raises(TeacherServerError, match="neither an opdkit teacher server .* nor an OpenAI-compatible"):
            detect_api(url404, token=None, timeout_s=5, retries=0)
        with pytest.raises(TeacherServerError, match="an HTML page: is this the server's root address"):
            RemoteTeacher(url404, top_k=5, retries=0)
    finally:
        for httpd in servers:
            httpd.shutdown()


def test_several_teacher_urls_are_shared_out_by_process():
    from opdkit.errors import OpdkitError
    from opdkit.teacher.connect import pick_url

    urls = "http://10.0.0.7:8000, http://10.0.0.7:8001"
    assert [pick_url(urls, r) for r in range(4)] == ["http://10.0.0.7:8000", "http://10.0.0.7:8001"] * 2
    assert pick_url("http://h:1", 5) == "http://h:1"
    for bad in ("http://h:1,,http://h:2", "h:8000", "http://h:8000/v1"):
        with pytest.raises(OpdkitError, match="teacher.url"):
            pick_url(bad, 0)


def test_opdkit_check_against_a_teacher_server(server, tiny_model_dirs, capsys):
    from opdkit.cli import main

    assert main(["check", "--student", str(tiny_model_dirs["qwen2"]), "--teacher", server, "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["teacher"] == server and report["ok"]
    assert any("dry-run rollout was skipped" in n for n in report["notes"])
