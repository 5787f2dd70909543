import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from datasets import Dataset, load_from_disk
from PIL import Image

from cgpo_trl.data.benchmarks import load_benchmark, save_benchmark
from cgpo_trl.data.reasoning import (
    BANNED_REASONING,
    JsonlCache,
    OpenAITeacher,
    Teacher,
    TeacherError,
    TeacherRequest,
    TemplateTeacher,
    build_reasoning_dataset,
    clean_expression,
    clean_reasoning,
    highlight,
    main,
    make_teacher,
)
from cgpo_trl.data.synthetic import generate_synthetic
from cgpo_trl.saliency.segmenters import load_segmenter
from cgpo_trl.saliency.tags import parse_answer
from cgpo_trl.saliency.vocabulary import parse_description


@pytest.fixture(scope="module")
def sod():
    return generate_synthetic(task="sod", num_samples=6, seed=4, rule="mixed")


@pytest.fixture(scope="module")
def segmenter():
    return load_segmenter("shapes")


def _pixels_key(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _assistant(row) -> str:
    return row["messages"][1]["content"][0]["text"]


@pytest.mark.parametrize("task", ["sod", "sis", "cosod"])
def test_template_teacher_with_known_answers(task):
    source = generate_synthetic(task=task, num_samples=4, seed=9, group_size=(3, 4))
    built, stats = build_reasoning_dataset(source, TemplateTeacher(), progress=False)
    assert stats.kept == stats.rows == stats.known_answers == 4 and stats.acceptance_rate is None
    for original, row in zip(source, built):
        text = _assistant(row)
        parsed = parse_answer(text, task=task)
        assert parsed.ok and text == row["solution"]
        assert (parsed.instances if task == "sis" else parsed.regions) == original["expressions"]
        user = row["messages"][0]
        assert user["role"] == "user" and row["messages"][1]["role"] == "assistant"
        assert [b["type"] for b in user["content"]] == ["image"] * len(original["images"]) + ["text"]
        assert len(row["images"]) == len(original["images"]) and row["task"] == task
        for image, want in zip(row["images"], original["images"]):
            assert image.tobytes() == want.tobytes()
        # The reasoning names the answer's object and never the teacher's privileged view.
        first = parse_description(original["expressions"][0])
        assert f"{first.colour} {first.shape}" in parsed.think
        assert not any(word in parsed.think.lower() for word in BANNED_REASONING)


class ScriptedTeacher(Teacher):
    """Expressions: rows in `good` get a wrong one at sample 0 and the right one after; other rows always wrong."""

    def __init__(self, rows, good):
        self.index = {row["images"][0].tobytes(): i for i, row in enumerate(rows)}
        self.rows, self.good, self.seen = rows, good, []

    def __call__(self, requests):
        replies = []
        for request in requests:
            self.seen.append(request)
            i = self.index[request.row["images"][0].tobytes()]
            if request.kind == "reasoning":
                # The first reasoning leaks the highlight and must be rejected; the second is fine.
                replies.append(
                    "The highlighted shape." if request.sample == 0 else f"It differs: {request.answer[0]}."
                )
            elif i in self.good and request.sample >= 1:
                replies.append(f'Expression: "{self.rows[i]["expressions"][0]}."')
            else:
                replies.append("the purple blob")
        return replies


def test_rejection_sampling_counts(sod, segmenter):
    good = {0, 2, 4}
    teacher = ScriptedTeacher(sod, good)
    built, stats = build_reasoning_dataset(
        sod, teacher, segmenter, num_candidates=3, use_known_expressions=False, progress=False
    )
    # Round 0: 6 candidates, none right; round 1: 6, three right; round 2: the 3 left, none right.
    assert stats.answer_requests == 6 and stats.expression_candidates == 15 and stats.expressions_accepted == 3
    assert stats.acceptance_rate == 0.5 and stats.candidate_acceptance_rate == pytest.approx(3 / 15)
    assert stats.answer_rejected_rows == 3 and stats.reasoning_candidates == 6 and stats.kept == 3
    assert [parse_answer(s).regions for s in built["solution"]] == [sod[i]["expressions"] for i in sorted(good)]
    assert all("It differs" in s for s in built["solution"])
    # The teacher saw the target highlighted: the region unchanged, the rest darkened.
    request = next(r for r in teacher.seen if r.kind == "expression")
    row = request.row
    shown, original = np.asarray(request.images[0]), np.asarray(row["images"][0])
    mask = np.asarray(row["masks"][0]) > 0
    np.testing.assert_array_equal(shown[mask], original[mask])
    assert shown[~mask].mean() < original[~mask].mean() * 0.6


def test_iou_threshold_and_missing_segmenter(sod, segmenter):
    class Partial(Teacher):  # names the target's colour only: matches the target plus same-coloured objects
        def __call__(self, requests):
            return [
                f"the {parse_description(r.row['expressions'][0]).colour} object" if r.kind == "expression" else "ok"
                for r in requests
            ]

    rows = generate_synthetic(task="sod", num_samples=8, seed=1, rule="shape")
    _, loose = build_reasoning_dataset(rows, Partial(), segmenter, 0.0, 1, False, progress=False)
    _, strict = build_reasoning_dataset(rows, Partial(), segmenter, 0.99, 1, False, progress=False)
    assert loose.expressions_accepted == 8
    # Under the shape rule about half the distractors share the target's colour: those targets fail at 0.99.
    shared = sum(any(o["colour"] == r["scene"][0][0]["colour"] for o in r["scene"][0][1:]) for r in rows)
    assert strict.expressions_accepted == 8 - shared and shared > 0
    with pytest.raises(TeacherError, match="need a segmenter"):
        build_reasoning_dataset(rows, Partial(), None, use_known_expressions=False, progress=False)


def test_cleaning_teacher_replies():
    assert clean_expression('Expression: "the red circle."\nmore text') == "the red circle"
    assert clean_expression("<answer><rg>the dog on the left</rg></answer>") == "the dog on the left"
    assert clean_expression("   \n  ") == "" and clean_expression("x" * 500) == ""
    assert clean_reasoning("<think>The red one\n stands out.</think><answer>x</answer>") == "The red one stands out."
    assert clean_reasoning("The outlined region is red.") is None
    assert clean_reasoning("It is <rg>the cat</rg>.") is None and clean_reasoning("  ") is None


def test_template_teacher_refuses_real_rows(tmp_path, sod):
    save_benchmark(sod, "ecssd", tmp_path / "ECSSD")
    real = load_benchmark("ecssd", tmp_path)
    with pytest.raises(TeacherError, match="only works on synthetic rows"):
        build_reasoning_dataset(real, TemplateTeacher(), load_segmenter("shapes"), progress=False)


def test_make_teacher_specs():
    assert isinstance(make_teacher("template"), TemplateTeacher)
    teacher = make_teacher("http://127.0.0.1:9", model="m")
    assert isinstance(teacher, OpenAITeacher) and teacher.base_url == "http://127.0.0.1:9/v1"
    assert OpenAITeacher("http://h/v1/chat/completions", model="m").base_url == "http://h/v1"
    with pytest.raises(ValueError, match="unknown teacher 'gpt'"):
        make_teacher("gpt")


def test_jsonl_cache_survives_a_cut_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = JsonlCache(path)
    cache.put("a", "one")
    cache.put("b", "two")
    with path.open("a") as handle:
        handle.write('{"key": "c", "te')  # interrupted mid-write
    reloaded = JsonlCache(path)
    assert reloaded.loaded == 2 and reloaded["b"] == "two" and "c" not in reloaded
    # The cut line is truncated, so the next answer starts its own line instead of being glued onto it.
    reloaded.put("c", "three")
    again = JsonlCache(path)
    assert again.loaded == 3 and again["c"] == "three"
    assert path.read_text().splitlines()[-1] == '{"key": "c", "text": "three"}'


# ------------------------------------------------------------------------------------- OpenAI-compatible server


class _State:
    def __init__(self, answers, fail_first=0, fail_after=None, always_fail=False, delay=0.0):
        self.answers = answers  # pixel key of the first image -> right expression
        self.fail_first, self.fail_after, self.always_fail, self.delay = fail_first, fail_after, always_fail, delay
        self.posts = self.served = self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _send(self, code, payload):
        body = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"data": [{"id": "teacher-model"}]})

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.posts += 1
            posts = state.posts
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        try:
            time.sleep(state.delay)
            if state.always_fail or posts <= state.fail_first:
                return self._send(503, {"error": "busy"})
            if state.fail_after is not None and state.served >= state.fail_after:
                return self._send(400, {"error": "quota exhausted"})
            assert body["model"] == "teacher-model" and self.path == "/v1/chat/completions"
            content = body["messages"][0]["content"]
            text = content[-1]["text"]
            url = content[0]["image_url"]["url"]
            image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            if "correct answer" in text:
                reply = "The odd one out differs from the rest by its look."
            elif body["seed"] == 0:
                reply = "the purple blob"
            else:
                reply = state.answers.get(_pixels_key(image), "unknown")
            with state.lock:
                state.served += 1
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": reply}}]})
        finally:
            with state.lock:
                state.in_flight -= 1


@pytest.fixture
def server():
    servers = []

    def start(state):
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.state = state
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def real_rows(tmp_path, sod):
    """Synthetic rows written as ECSSD and loaded back: no expressions, as with real data."""
    save_benchmark(sod, "ecssd", tmp_path / "ECSSD")
    real = load_benchmark("ecssd", tmp_path)
    answers = {
        _pixels_key(highlight(row["images"][0], np.asarray(row["masks"][0]) > 127)): original["expressions"][0]
        for row, original in zip(real, sod)
    }
    return real, answers


def test_http_teacher_retries_limits_concurrency_and_filters(server, real_rows, segmenter):
    real, answers = real_rows
    state = _State(answers, fail_first=2, delay=0.02)
    teacher = OpenAITeacher(server(state), concurrency=2, max_retries=3, backoff=0.01)
    built, stats = build_reasoning_dataset(real, teacher, segmenter, num_candidates=2, progress=False)
    assert stats.acceptance_rate == 1.0 and stats.candidate_acceptance_rate == 0.5 and stats.kept == 6
    # 6 wrong + 6 right expressions + 6 reasonings answered; the two 503s were retried.
    assert state.served == 18 and state.posts == 20 and teacher.calls == 18
    assert state.max_in_flight == 2
    assert [parse_answer(s).regions[0] for s in built["solution"]] == list(answers.values())
    # Images of real rows stay file paths.
    assert built.with_format("arrow")[0:1]["images"].to_pylist()[0][0]["path"].endswith("00000.png")


def test_http_teacher_gives_up_naming_the_url(server, real_rows, segmenter):
    real, answers = real_rows
    state = _State(answers, always_fail=True)
    url = server(state)
    teacher = OpenAITeacher(url, max_retries=2, backoff=0.001, concurrency=1)
    with pytest.raises(TeacherError, match=rf"POST {url}/v1/chat/completions failed after 3 attempts; .*HTTP 503"):
        build_reasoning_dataset(real.select(range(1)), teacher, segmenter, progress=False)
    assert state.posts == 3


def test_interrupted_build_resumes_from_the_cache(server, real_rows, segmenter, tmp_path):
    real, answers = real_rows
    cache = tmp_path / "teacher.jsonl"
    first = _State(answers, fail_after=7)
    with pytest.raises(TeacherError, match="HTTP 400"):
        build_reasoning_dataset(
            real,
            OpenAITeacher(server(first), cache_path=cache, concurrency=1),
            segmenter,
            0.5,
            2,
            batch_size=4,
            progress=False,
        )
    assert len(cache.read_text().splitlines()) == 7
    second = _State(answers)
    teacher = OpenAITeacher(server(second), cache_path=cache, concurrency=3)
    built, stats = build_reasoning_dataset(real, teacher, segmenter, 0.5, 2, batch_size=4, progress=False)
    assert stats.kept == 6 and second.served == 18 - 7 and teacher.calls == 11
    assert len(cache.read_text().splitlines()) == 18
    assert [parse_answer(s).regions[0] for s in built["solution"]] == list(answers.values())


def test_cli_builds_and_reports(tmp_path, capsys):
    out = tmp_path / "sft"
    stats = main(["--dataset", "synthetic-sis", "--num_samples", "3", "--out", str(out), "--teacher", "template"])
    assert stats.kept == 3
    built = load_from_disk(str(out))
    assert len(built) == 3 and parse_answer(built[0]["solution"], task="sis").ok
    report = json.loads((out / "build_stats.json").read_text())
    assert report["kept"] == 3 and report["known_answers"] == 3
    assert '"kept": 3' in capsys.readouterr().out


@pytest.mark.slow
def test_output_feeds_trl_vlm_collator():
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from cgpo_trl.testing import build_tiny_processor

    processor = build_tiny_processor()
    rows = []
    for task in ("sod", "cosod"):
        source = generate_synthetic(task=task, num_samples=1, group_size=(3, 3))
        rows.append(build_reasoning_dataset(source, TemplateTeacher(), progress=False)[0][0])
    batch = DataCollatorForVisionLanguageModeling(processor)(rows)
    image_token = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # 56-px images: 4 image tokens each; the CoSOD row holds 3 images.
    assert (batch["input_ids"] == image_token).sum(dim=1).tolist() == [4, 12]
    assert batch["image_grid_thw"].shape[0] == 4 and "pixel_values" in batch
    assert (batch["labels"] != -100).any()


@pytest.mark.slow
def test_local_vlm_teacher_generates_and_caches(tmp_path, sod):
    from cgpo_trl.data.reasoning import LocalVLMTeacher
    from cgpo_trl.testing import save_tiny_vlm

    path = save_tiny_vlm(tmp_path / "tiny")
    teacher = LocalVLMTeacher(path, max_new_tokens=6, cache_path=tmp_path / "cache.jsonl")
    request = TeacherRequest("reasoning", "sod", [sod[0]["images"][0]], "Why?", 0, sod[0], ("the red circle",))
    (reply,) = teacher([request])
    assert isinstance(reply, str) and teacher.calls == 1
    assert teacher([request]) == [reply] and teacher.calls == 1  # served from the cache
    built, stats = build_reasoning_dataset(sod.select(range(2)), teacher, num_candidates=1, progress=False)
    assert stats.rows == 2 and stats.kept + stats.reasoning_rejected_rows == 2
    for text in built["solution"]:
        assert parse_answer(text, task="sod").ok


class OracleTeacher(Teacher):
    """Answers expression requests from a table keyed by the first highlighted image's pixels."""

    def __init__(self, table):
        self.table = table

    def __call__(self, requests):
        return [
            self.table.get(_pixels_key(r.images[0]), "the purple blob") if r.kind == "expression" else "I look."
            for r in requests
        ]


@pytest.mark.parametrize("task, name", [("sis", "soc"), ("cosod", "coca")])
def test_real_sis_and_cosod_rows_get_checked_expressions(tmp_path, segmenter, task, name):
    from cgpo_trl.data.rows import decode_instance

    source = generate_synthetic(task=task, num_samples=3, seed=5, group_size=(3, 3))
    save_benchmark(source, name, tmp_path)
    real = load_benchmark(name, tmp_path)
    table = {}
    for row, original in zip(real, source):
        if task == "sis":
            for rle, expression in zip(row["instances"], original["expressions"]):
                table[_pixels_key(highlight(row["images"][0], decode_instance(rle)))] = expression
        else:
            first = highlight(row["images"][0], np.asarray(row["masks"][0]) > 127)
            table[_pixels_key(first)] = original["expressions"][0]
    built, stats = build_reasoning_dataset(real, OracleTeacher(table), segmenter, num_candidates=1, progress=False)
    targets = sum(len(r["instances"]) for r in real) if task == "sis" else 3
    assert stats.answer_requests == targets == stats.expressions_accepted and stats.kept == 3
    by_group = {row["group"]: row for row in source}
    for row, original in zip(built, real):
        want = by_group[original["group"]]["expressions"] if task == "cosod" else None
        parsed = parse_answer(row["solution"], task=task)
        assert parsed.ok and len(row["images"]) == len(original["images"])
        if task == "cosod":
            assert parsed.regions == want
    # A wrong expression for one SIS instance rejects the whole row.
    if task == "sis":
        key = next(iter(table))
        table[key] = "the purple blob"
        _, partial = build_reasoning_dataset(real, OracleTeacher(table), segmenter, num_candidates=1, progress=False)
        assert partial.expressions_accepted == targets - 1 and partial.answer_rejected_rows == 1


class FixedReasoning(Teacher):
    """Answers every reasoning request with one sentence and records the requests."""

    def __init__(self):
        self.seen = []

    def __call__(self, requests):
        self.seen.extend(requests)
        return ["Only small scattered shapes; none of them stands out." for _ in requests]


def test_rows_with_nothing_salient_get_the_empty_answer(segmenter):
    """An SIS image without instances (SOC's non-salient images) and an SOD image with an empty mask are kept with
    `<answer></answer>` — the answer the rewards score 1 on empty ground truth — instead of being dropped."""
    sources = []
    for task in ("sis", "sod"):
        dataset = generate_synthetic(task=task, num_samples=1, seed=3)
        row = dict(dataset[0])
        if task == "sis":
            row.update(instances=[], expressions=[])
        else:
            row.update(masks=[Image.new("L", row["masks"][0].size, 0)], expressions=[])
        sources.append(Dataset.from_list([row], features=dataset.features))
    teacher = FixedReasoning()
    for source in sources:
        built, stats = build_reasoning_dataset(source, teacher, segmenter=segmenter, progress=False)
        assert stats.kept == 1, stats
        text = _assistant(built[0])
        assert text.endswith("<answer></answer>")
        assert parse_answer(text, task=source[0]["task"], allow_empty=True).ok
    assert all("nothing in it is salient" in request.text for request in teacher.seen)
