"""Stage-1 SFT data built "from output to reasoning": first the answer, then the reasoning that leads to it.

1. **Answer.** Synthetic rows know their expressions. Real rows only have masks, so a teacher VLM is shown each
   image with the ground-truth region highlighted (the rest darkened, the region outlined) and writes a referring
   expression. The expression is kept only if the configured segmenter, given the *plain* image and that
   expression, reproduces the ground truth with IoU >= `iou_threshold` (SIS: each instance on its own; CoSOD: the
   mean IoU over the group). Up to `num_candidates` expressions are sampled per target: rejection sampling, and
   the acceptance rates are reported.
2. **Reasoning.** The teacher sees the plain image(s) and the accepted answer, and writes the `<think>` text that
   leads to it. Text mentioning masks, outlines or highlighting (the teacher's privileged view) is rejected.

Teachers (`make_teacher(spec)`): `template` narrates a synthetic row's scene offline; `local:PATH` runs a local
transformers VLM (`cgpo_trl.models.load_model_and_processor`); `http://…` / `https://…` calls an OpenAI-compatible
chat endpoint (e.g. `vllm serve`) with retries and exponential backoff, a concurrency limit, and a JSONL cache
(`cache_path`) that also makes an interrupted build resume where it stopped.

The output is a `datasets.Dataset` with `messages` (the task's user turn from `build_prompt`, then an assistant
turn holding `<think>…</think><answer>…</answer>`) and `images`, the format TRL's `SFTTrainer` (its
`DataCollatorForVisionLanguageModeling`) consumes for VLMs; `task`, `group` and `solution` ride along.

CLI: `python -m cgpo_trl.data.reasoning --dataset synthetic-sod --teacher template --out DIR` (or a YAML file of
the same fields as the only argument) saves with `save_to_disk` and prints the acceptance statistics.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import io
import json
import os
import random
import re
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset, Features, Image, List, Value
from PIL import Image as PILImage
from tqdm.auto import tqdm

from ..saliency.prompts import build_prompt
from ..saliency.tags import TASK_TAGS, TagLimits, format_answer, parse_answer
from .rows import MESSAGE, decode_instance

SFT_FEATURES = Features(
    {
        "messages": List(MESSAGE),
        "images": List(Image(mode="RGB")),
        "task": Value("string"),
        "group": Value("string"),
        "solution": Value("string"),
    }
)
"""`messages` + `images` for TRL's SFTTrainer; `solution` repeats the assistant text for inspection."""

EXPRESSION_PROMPTS = {
    "sod": (
        "In this picture the most salient object is shown at full brightness with a white outline; the rest is "
        "darkened. Write one short referring expression (at most 12 words) that picks out exactly this object in "
        "the original picture, for example 'the brown dog on the left'. Reply with the expression only."
    ),
    "sis": (
        "In this picture one salient object is shown at full brightness with a white outline; the rest is "
        "darkened. Write one short referring expression (at most 12 words) that picks out exactly this object and "
        "no other in the original picture, for example 'the man on the left'. Reply with the expression only."
    ),
    "cosod": (
        "These {num_images} pictures share one salient object, shown at full brightness with a white outline in "
        "each; the rest is darkened. Write one short referring expression (at most 12 words) that picks out this "
        "object in every original picture, for example 'the red apple'. Reply with the expression only."
    ),
}
REASONING_PROMPT = (
    "{question} The correct answer is: {answer}. Write the reasoning a careful observer would follow from the "
    "{pictures} to exactly this answer: what the scene contains, what stands out and why. Write it as your own "
    "observation in 2 to 5 sentences; do not say that you were given the answer, and do not mention masks, "
    "outlines or highlighting. Reply with the reasoning only."
)
QUESTIONS = {
    "sod": "Which object in the picture is salient, the one a person looks at first?",
    "sis": "Which objects in the picture are salient instances?",
    "cosod": "Which salient object do all these {num_images} pictures share?",
}
BANNED_REASONING = ("mask", "highlight", "outline", "darkened", "overlay", "ground truth", "given the answer")
"""Reasoning mentioning any of these (case-insensitive) leaks the teacher's privileged view and is rejected."""


class TeacherError(RuntimeError):
    """A teacher could not answer (endpoint unreachable after retries, bad configuration, unusable rows)."""


@dataclass
class TeacherRequest:
    """One thing asked of a teacher: an `expression` for highlighted image(s), or the `reasoning` for an answer."""

    kind: str
    task: str
    images: list
    text: str
    sample: int = 0
    """Candidate index: distinct cache keys and sampling seeds for the repeated draws of rejection sampling."""
    row: dict | None = None
    """The source row (the template teacher reads a synthetic row's `scene`)."""
    answer: tuple[str, ...] = ()
    """The expressions the reasoning must lead to."""
    target: int = 0
    """SIS: which instance an expression request is about."""


class Teacher(abc.ABC):
    """Answers batches of `TeacherRequest`s with one text each."""

    @abc.abstractmethod
    def __call__(self, requests: Sequence[TeacherRequest]) -> list[str]: ...


# --------------------------------------------------------------------------------------------- template teacher


def _where(bbox: Sequence[int], size: tuple[int, int]) -> str:
    x, y, w, h = bbox
    cx, cy = (x + w / 2) / size[0], (y + h / 2) / size[1]
    vertical = "upper" if cy < 0.4 else "lower" if cy > 0.6 else ""
    horizontal = "left" if cx < 0.4 else "right" if cx > 0.6 else ""
    if not vertical and not horizontal:
        return "near the centre"
    return (
        "in the "
        + " ".join(w for w in (vertical, horizontal) if w)
        + (" part" if not (vertical and horizontal) else "")
    )


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _a(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _listing(objects: list[dict], size: tuple[int, int]) -> str:
    return _join([f"{_a(_name(o))} {_where(o['bbox'], size)}" for o in objects])


class TemplateTeacher(Teacher):
    """Offline teacher for synthetic rows: expressions come from the row, reasoning narrates its `scene`."""

    def __call__(self, requests):
        return [self._answer(r) for r in requests]

    def _answer(self, request: TeacherRequest) -> str:
        row = request.row or {}
        if not row.get("scene"):
            raise TeacherError(
                "the template teacher only works on synthetic rows (with a `scene` column); use a VLM teacher "
                "(local:PATH or an http:// endpoint) for real images"
            )
        if request.kind == "expression":
            expressions = row["expressions"]
            return expressions[request.target] if request.task == "sis" else expressions[0]
        rng = random.Random(f"{row.get('solution', '')}|{request.sample}|{row['scene'][0][0]['bbox']}")
        size = row["images"][0].size
        if request.task == "sod":
            return self._sod(row, rng, size)
        if request.task == "sis":
            return self._sis(row, rng, size)
        return self._cosod(row)

    @staticmethod
    def _sod(row, rng, size) -> str:
        scene = list(row["scene"][0])
        target = next(o for o in scene if o["salient"])
        others = [o for o in scene if not o["salient"]]
        if not others:
            return (
                f"The picture shows a single object, {_a(_name(target))} {_where(target['bbox'], size)}, on a plain "
                "grey background. With nothing else competing for attention, it is the salient object."
            )
        rng.shuffle(scene)
        seen = f"I see {len(scene)} objects on a grey background: {_listing(scene, size)}."
        rule = row.get("rule") or "colour"
        if rule == "colour":
            why = (
                f"All the others are {others[0]['colour']}; only the {_name(target)} has a different colour, so it "
                "is the odd one out and draws the eye first."
            )
        elif rule == "shape":
            why = (
                f"The others are all {others[0]['shape']}s; the {_name(target)} is the only {target['shape']}, so "
                "its shape makes it stand out."
            )
        else:
            why = f"The {_name(target)} is much larger than the others, so it dominates the picture and draws the eye first."
        return f"{seen} {why}"

    @staticmethod
    def _sis(row, rng, size) -> str:
        scene = row["scene"][0]
        salient = [o for o in scene if o["salient"]]
        clutter = [o for o in scene if not o["salient"]]
        if not salient:
            return "Only small shapes are scattered around; none of them stands out, so nothing here is salient."
        text = f"There are {len(salient)} large objects: {_listing(salient, size)}."
        if clutter:
            text += f" The {len(clutter)} small shapes scattered around are background clutter."
        return text + " Each large object is a separate salient instance, so I name each one by colour and shape."

    @staticmethod
    def _cosod(row) -> str:
        parts = []
        for index, scene in enumerate(row["scene"], start=1):
            names = [_name(o) for o in scene]
            parts.append(
                f"picture {index} shows "
                + (names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1])
            )
        common = next(o for o in row["scene"][0] if o["salient"])
        return (
            "; ".join(parts).capitalize()
            + f". The only object present in every picture is the {_name(common)}, seen at different sizes and "
            "positions, so it is the co-salient object."
        )


# ------------------------------------------------------------------------------------------- chat-based teachers


class JsonlCache:
    """Append-only JSONL map from request key to teacher text; lines are flushed as answers arrive."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._items: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):  # an interrupted write: cut it so the next record starts a line
                data = data[: data.rfind(b"\n") + 1]
                with self.path.open("r+b") as handle:
                    handle.truncate(len(data))
            for line in data.decode("utf-8", errors="replace").splitlines():
                try:
                    item = json.loads(line)
                    self._items[item["key"]] = item["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a damaged line
        self.loaded = len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __len__(self) -> int:
        return len(self._items)

    def put(self, key: str, text: str) -> None:
        with self._lock:
            self._items[key] = text
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a") as handle:
                    handle.write(json.dumps({"key": key, "text": text}) + "\n")


def _png_bytes(image: PILImage.Image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class ChatTeacher(Teacher):
    """A VLM teacher answering (images, text) chat prompts; answers are cached by request content."""

    def __init__(self, cache_path: str | os.PathLike | None = None):
        self.cache = JsonlCache(cache_path)
        self.calls = 0  # answers generated (not served from the cache)

    @property
    @abc.abstractmethod
    def identity(self) -> dict:
        """What, besides the request, determines the answer (model, sampling settings): part of the cache key."""

    def key(self, request: TeacherRequest) -> str:
        digest = hashlib.sha256()
        digest.update(
            json.dumps({**self.identity, "text": request.text, "sample": request.sample}, sort_keys=True).encode()
        )
        for image in request.images:
            digest.update(hashlib.sha256(image.convert("RGB").tobytes()).digest())
            digest.update(f"{image.width}x{image.height}".encode())
        return digest.hexdigest()

    def __call__(self, requests):
        keys = [self.key(r) for r in requests]
        todo = {k: r for k, r in zip(keys, requests) if k not in self.cache}
        for key, text in self._generate(list(todo.items())):
            self.cache.put(key, text)
            self.calls += 1
        return [self.cache[k] for k in keys]

    @abc.abstractmethod
    def _generate(self, items: list[tuple[str, TeacherRequest]]) -> Iterator[tuple[str, str]]:
        """Yield (key, text) for each item as soon as it is answered (so the cache keeps partial progress)."""


class OpenAITeacher(ChatTeacher):
    """Any OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang, TGI, hosted APIs).

    Images travel as base64 PNG data URLs. Connection errors, timeouts, 429 and 5xx answers are retried with
    exponential backoff (`backoff * 2**attempt` seconds, plus jitter); other HTTP errors fail at once. At most
    `concurrency` requests are in flight.
    """

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 512,
        concurrency: int = 8,
        max_retries: int = 4,
        backoff: float = 1.0,
        timeout: float = 120.0,
        cache_path: str | os.PathLike | None = None,
    ):
        super().__init__(cache_path)
        if concurrency < 1 or max_retries < 0:
            raise ValueError(f"need concurrency >= 1 and max_retries >= 0, got {concurrency}, {max_retries}")
        base = url.rstrip("/")
        if base.endswith("/chat/completions"):
            base = base[: -len("/chat/completions")]
        if not re.search(r"/v\d+$", base):
            base += "/v1"
        self.base_url = base
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.temperature, self.max_tokens = temperature, max_tokens
        self.concurrency, self.max_retries, self.backoff, self.timeout = concurrency, max_retries, backoff, timeout
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:  # ask the server which model it serves (vLLM serves one)
            listing = self._request("GET", "/models", None)
            try:
                self._model = listing["data"][0]["id"]
            except (KeyError, IndexError, TypeError):
                raise TeacherError(f"{self.base_url}/models lists no model; pass model=") from None
        return self._model

    @property
    def identity(self) -> dict:
        return {"teacher": "http", "model": self.model, "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _request(self, method: str, path: str, body: dict | None) -> dict:
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1) * (1 + 0.1 * random.random()))
            try:
                request = urllib.request.Request(url, data=data, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:300]
                if error.code != 429 and error.code < 500:
                    raise TeacherError(f"{method} {url} failed with HTTP {error.code}: {detail}") from None
                last_error = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as error:
                last_error = f"{type(error).__name__}: {error}"
        raise TeacherError(f"{method} {url} failed after {self.max_retries + 1} attempts; last error: {last_error}")

    def _complete(self, request: TeacherRequest) -> str:
        content = [
            {
                "type": "image_url",
                "image_url": {"url": "data:image/png;base64," + base64.b64encode(_png_bytes(im)).decode()},
            }
            for im in request.images
        ]
        content.append({"type": "text", "text": request.text})
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": request.sample,
        }
        reply = self._request("POST", "/chat/completions", body)
        try:
            return reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise TeacherError(
                f"{self.base_url}/chat/completions answered without choices[0].message.content"
            ) from None

    def _generate(self, items):
        if not items:
            return
        _ = self.model  # resolve once before the threads start
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._complete, request): key for key, request in items}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()


class LocalVLMTeacher(ChatTeacher):
    """A transformers VLM checkpoint (hub id or folder) loaded with `cgpo_trl.models.load_model_and_processor`."""

    def __init__(
        self,
        path: str,
        device: str = "cpu",
        dtype: str = "float32",
        temperature: float = 0.7,
        max_new_tokens: int = 256,
        seed: int = 0,
        cache_path: str | os.PathLike | None = None,
    ):
        super().__init__(cache_path)
        from ..models import load_model_and_processor

        self.path, self.temperature, self.max_new_tokens, self.seed = str(path), temperature, max_new_tokens, seed
        self.model, self.processor = load_model_and_processor(path, dtype=dtype, device=device)
        self.model.eval()

    @property
    def identity(self) -> dict:
        return {
            "teacher": "local",
            "model": self.path,
            "temperature": self.temperature,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
        }

    def _generate(self, items):
        import torch

        for key, request in items:
            messages = [
                {
                    "role": "user",
                    "content": [{"type": "image"} for _ in request.images] + [{"type": "text", "text": request.text}],
                }
            ]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = self.processor(
                text=[text], images=[im.convert("RGB") for im in request.images], return_tensors="pt"
            )
            inputs = inputs.to(self.model.device)
            torch.manual_seed(self.seed + request.sample)
            sampling = (
                {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
            )
            with torch.no_grad():
                output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
            new_tokens = output[0, inputs["input_ids"].shape[1] :]
            yield key, self.processor.batch_decode([new_tokens], skip_special_tokens=True)[0]


def make_teacher(spec: str, cache_path: str | os.PathLike | None = None, **options) -> Teacher:
    """`template`, `local:PATH` (options: device, dtype, temperature, max_new_tokens, seed) or an `http(s)://` URL
    (options: model, api_key, temperature, max_tokens, concurrency, max_retries, backoff, timeout)."""
    if spec == "template":
        return TemplateTeacher()
    if spec.startswith("local:"):
        return LocalVLMTeacher(spec.removeprefix("local:"), cache_path=cache_path, **options)
    if spec.startswith(("http://", "https://")):
        return OpenAITeacher(spec, cache_path=cache_path, **options)
    raise ValueError(f"unknown teacher {spec!r}: expected 'template', 'local:PATH' or an http(s):// URL")


# -------------------------------------------------------------------------------------------------- building


def highlight(image: PILImage.Image, mask: np.ndarray) -> PILImage.Image:
    """The teacher's view of a target: the region at full brightness with a white outline, the rest darkened."""
    from skimage.segmentation import find_boundaries

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    region = np.asarray(mask) > 0
    shown = np.where(region[..., None], pixels, pixels * 0.35)
    shown[find_boundaries(region, mode="outer")] = 255.0
    return PILImage.fromarray(shown.round().astype(np.uint8))


def clean_expression(text: str, limit: int = TagLimits().max_expression_chars) -> str:
    """The expression in a teacher's reply: first non-empty line, tags, quotes and a final full stop removed."""
    inner = re.search(r"<(rg|ins)>(.*?)</\1>", text, flags=re.S)
    if inner:
        text = inner.group(2)
    text = re.sub(r"</?\w+>", " ", text)
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = re.sub(r"^(referring )?expression\s*:\s*", "", line, flags=re.I)
    line = line.strip().strip("\"'`*").strip().rstrip(".").strip()
    return line if len(line) <= limit else ""


def clean_reasoning(text: str) -> str | None:
    """The reasoning in a teacher's reply, or None when it is empty, leaks the privileged view, or holds tags."""
    text = text.split("<answer>")[0]
    text = re.sub(r"</?think>", " ", text)
    text = " ".join(text.split())
    if not text or re.search(r"</?(rg|ins|answer)>", text):
        return None
    lowered = text.lower()
    if any(word in lowered for word in BANNED_REASONING):
        return None
    return text


def _iou(prediction: np.ndarray, target: np.ndarray) -> float:
    union = np.logical_or(prediction, target).sum()
    return float(np.logical_and(prediction, target).sum() / union) if union else 0.0


@dataclass
class BuildStats:
    """What the builder did; `acceptance_rate` is the share of teacher-answered targets that passed the IoU check."""

    rows: int = 0
    known_answers: int = 0
    answer_requests: int = 0
    """Targets (SOD image, SIS instance, CoSOD group) whose expression the teacher had to write."""
    expression_candidates: int = 0
    expressions_accepted: int = 0
    answer_rejected_rows: int = 0
    reasoning_candidates: int = 0
    reasoning_rejected_rows: int = 0
    kept: int = 0

    @property
    def acceptance_rate(self) -> float | None:
        return self.expressions_accepted / self.answer_requests if self.answer_requests else None

    @property
    def candidate_acceptance_rate(self) -> float | None:
        return self.expressions_accepted / self.expression_candidates if self.expression_candidates else None

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "acceptance_rate": self.acceptance_rate,
            "candidate_acceptance_rate": self.candidate_acceptance_rate,
        }


def _masks_of(row: dict) -> list[np.ndarray]:
    """Targets of a row: SOD one mask, SIS one per instance, CoSOD one per image."""
    if row["task"] == "sis":
        return [decode_instance(rle) for rle in row["instances"]]
    return [np.asarray(m.convert("L")) > 127 for m in row["masks"]]


def _answer_requests(row: dict, sample: int, pending: list[int]) -> list[TeacherRequest]:
    task, images, masks = row["task"], row["images"], _masks_of(row)
    if task == "sis":
        return [
            TeacherRequest(
                "expression", task, [highlight(images[0], masks[i])], EXPRESSION_PROMPTS[task], sample, row, target=i
            )
            for i in pending
        ]
    shown = [highlight(image, mask) for image, mask in zip(images, masks)]
    return [
        TeacherRequest("expression", task, shown, EXPRESSION_PROMPTS[task].format(num_images=len(images)), sample, row)
    ]


def build_reasoning_dataset(
    dataset: Dataset,
    teacher: Teacher,
    segmenter=None,
    iou_threshold: float = 0.5,
    num_candidates: int = 3,
    use_known_expressions: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[Dataset, BuildStats]:
    """Build SFT rows from contract rows (synthetic or benchmark). Returns the dataset and its `BuildStats`.

    `segmenter` (a `ReferringSegmenter`) is required whenever the teacher writes expressions, i.e. for rows without
    `expressions` or with `use_known_expressions=False`.
    """
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    if num_candidates < 1 or batch_size < 1:
        raise ValueError(f"num_candidates and batch_size must be >= 1, got {num_candidates}, {batch_size}")
    stats = BuildStats()
    arrow = dataset.with_format("arrow")  # undecoded images: carry their paths / bytes through unchanged
    columns: dict[str, list] = {name: [] for name in SFT_FEATURES}
    bar = tqdm(total=len(dataset), desc="output-to-reasoning", disable=not progress)
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        raw_images = arrow[start : start + len(rows)]["images"].to_pylist()
        answers = _answers(rows, teacher, segmenter, iou_threshold, num_candidates, use_known_expressions, stats)
        thoughts = _reasonings(rows, answers, teacher, num_candidates, stats)
        for offset, (row, answer, think) in enumerate(zip(rows, answers, thoughts)):
            stats.rows += 1
            if answer is None:
                stats.answer_rejected_rows += 1
                continue
            if think is None:
                stats.reasoning_rejected_rows += 1
                continue
            tag = TASK_TAGS[row["task"]]
            text = format_answer(think, **({"instances": answer} if tag == "ins" else {"regions": answer}))
            parsed = parse_answer(text, task=row["task"], allow_empty=True)
            if not parsed.ok or (parsed.instances if tag == "ins" else parsed.regions) != list(answer):
                stats.reasoning_rejected_rows += 1
                continue
            user = build_prompt(row["task"], len(row["images"]))[0]
            columns["messages"].append([user, {"role": "assistant", "content": [{"type": "text", "text": text}]}])
            columns["images"].append(raw_images[offset])
            columns["task"].append(row["task"])
            columns["group"].append(row.get("group") or "")
            columns["solution"].append(text)
            stats.kept += 1
        bar.update(len(rows))
        bar.set_postfix(
            kept=stats.kept, accept=f"{stats.acceptance_rate:.2f}" if stats.acceptance_rate is not None else "-"
        )
    bar.close()
    return Dataset.from_dict(columns, features=SFT_FEATURES), stats


def _answers(rows, teacher, segmenter, threshold, num_candidates, use_known, stats) -> list[list[str] | None]:
    """Known expressions, or teacher expressions accepted by the segmenter (None: every candidate rejected)."""
    answers: list[list[str] | None] = [None] * len(rows)
    # pending[i] = targets of row i still without an accepted expression (SIS: instance indices; else [0]).
    pending: dict[int, list[int]] = {}
    accepted: dict[int, dict[int, str]] = {}
    for i, row in enumerate(rows):
        if use_known and row.get("expressions"):
            answers[i] = list(row["expressions"])
            stats.known_answers += 1
            continue
        targets = list(range(len(row["instances"]))) if row["task"] == "sis" else [0]
        if row["task"] != "cosod" and not any(mask.any() for mask in _masks_of(row)):
            answers[i] = []  # nothing is salient: the answer is the empty `<answer></answer>`
            continue
        if segmenter is None:
            raise TeacherError("rows without known expressions need a segmenter to check the teacher's expressions")
        pending[i], accepted[i] = targets, {}
        stats.answer_requests += len(targets)
    for sample in range(num_candidates):
        requests = [r for i in pending for r in _answer_requests(rows[i], sample, pending[i])]
        owners = [i for i in pending for _ in (pending[i] if rows[i]["task"] == "sis" else [0])]
        if not requests:
            break
        replies = teacher(requests)
        stats.expression_candidates += len(requests)
        images, expressions, targets, plan = [], [], [], []
        for request, owner, reply in zip(requests, owners, replies):
            expression = clean_expression(reply)
            if not expression:
                continue
            masks = _masks_of(rows[owner])
            chosen = [masks[request.target]] if request.task == "sis" else masks
            for image, mask in zip(rows[owner]["images"], chosen):
                images.append(image)
                expressions.append(expression)
                targets.append(mask)
            plan.append((owner, request.target, expression, len(chosen)))
        results = segmenter.segment(images, expressions, mode="region") if images else []
        position = 0
        for owner, target, expression, count in plan:
            ious = [_iou(results[position + k][0] >= 0.5, targets[position + k]) for k in range(count)]
            position += count
            if np.mean(ious) >= threshold and target in pending[owner]:
                accepted[owner][target] = expression
                pending[owner].remove(target)
                stats.expressions_accepted += 1
        pending = {i: t for i, t in pending.items() if t}
    for i, found in accepted.items():
        if i not in pending:
            answers[i] = [found[t] for t in sorted(found)]
    return answers


def _reasonings(rows, answers, teacher, num_candidates, stats) -> list[str | None]:
    thoughts: list[str | None] = [None] * len(rows)
    waiting = [i for i, a in enumerate(answers) if a is not None]
    for sample in range(num_candidates):
        if not waiting:
            break
        requests = []
        for i in waiting:
            row, n = rows[i], len(rows[i]["images"])
            question = QUESTIONS[row["task"]].format(num_images=n)
            text = REASONING_PROMPT.format(
                question=question,
                answer="; ".join(f'"{a}"' for a in answers[i]) or "nothing in it is salient",
                pictures="pictures" if n > 1 else "picture",
            )
            requests.append(
                TeacherRequest("reasoning", row["task"], list(row["images"]), text, sample, row, tuple(answers[i]))
            )
        replies = teacher(requests)
        stats.reasoning_candidates += len(requests)
        still = []
        for i, reply in zip(waiting, replies):
            think = clean_reasoning(reply)
            if think is None:
                still.append(i)
            else:
                thoughts[i] = think
        waiting = still
    return thoughts


# ------------------------------------------------------------------------------------------------------- CLI


@dataclass
class ReasoningArguments:
    """Arguments of `python -m cgpo_trl.data.reasoning`."""

    dataset: str = field(
        metadata={"help": "synthetic-sod|synthetic-sis|synthetic-cosod or a benchmark name (duts-tr, ...)."}
    )
    out: str = field(metadata={"help": "Folder for `save_to_disk` (statistics go to OUT/build_stats.json)."})
    teacher: str = field(default="template", metadata={"help": "template, local:PATH, or an http(s):// endpoint URL."})
    data_dir: str | None = field(default=None, metadata={"help": "Benchmark folder (not needed for synthetic-*)."})
    split: str | None = field(default=None, metadata={"help": "Synthetic split / SIS split folder."})
    num_samples: int = field(default=1000, metadata={"help": "Synthetic rows to generate."})
    seed: int = field(default=0, metadata={"help": "Synthetic seed."})
    limit: int | None = field(default=None, metadata={"help": "Use at most this many input rows."})
    skip_bad: bool = field(
        default=False, metadata={"help": "Skip (and count) bad benchmark files instead of failing."}
    )
    segmenter: str = field(default="shapes", metadata={"help": "Segmenter that checks the teacher's expressions."})
    segmenter_checkpoint: str | None = field(default=None, metadata={"help": "Checkpoint for weighted segmenters."})
    device: str = field(default="cpu", metadata={"help": "Device for the segmenter and a local teacher."})
    iou_threshold: float = field(default=0.5, metadata={"help": "Keep an expression if its mask reaches this IoU."})
    num_candidates: int = field(default=3, metadata={"help": "Expressions (and reasonings) sampled per target."})
    use_known_expressions: bool = field(default=True, metadata={"help": "Take synthetic rows' expressions as given."})
    batch_size: int = field(default=16, metadata={"help": "Rows per teacher round."})
    cache: str | None = field(default=None, metadata={"help": "JSONL cache of teacher answers (resumes a build)."})
    model: str | None = field(default=None, metadata={"help": "HTTP teacher: model name (default: the served one)."})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "HTTP teacher: env var with the API key."})
    concurrency: int = field(default=8, metadata={"help": "HTTP teacher: requests in flight."})
    max_retries: int = field(default=4, metadata={"help": "HTTP teacher: retries per request."})
    temperature: float = field(default=0.7, metadata={"help": "Teacher sampling temperature."})
    max_tokens: int = field(default=512, metadata={"help": "Teacher reply length limit (tokens)."})


def run(args: ReasoningArguments) -> BuildStats:
    from .benchmarks import load_saliency_dataset

    extra = {"num_samples": args.num_samples, "seed": args.seed} if args.dataset.startswith("synthetic-") else {}
    dataset = load_saliency_dataset(args.dataset, args.data_dir, skip_bad=args.skip_bad, split=args.split, **extra)
    if args.limit is not None:
        dataset = dataset.select(range(min(args.limit, len(dataset))))
    options: dict = {}
    if args.teacher.startswith("local:"):
        options = {"device": args.device, "temperature": args.temperature, "max_new_tokens": args.max_tokens}
    elif args.teacher.startswith(("http://", "https://")):
        options = {
            "model": args.model,
            "api_key": os.environ.get(args.api_key_env),
            "temperature": args.temperature,
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "max_retries": args.max_retries,
        }
    teacher = make_teacher(args.teacher, cache_path=args.cache, **options)
    needs_segmenter = not args.use_known_expressions or "expressions" not in dataset.column_names
    segmenter = None
    if needs_segmenter:
        from ..saliency.segmenters import load_segmenter

        kwargs = {"device": args.device}
        if args.segmenter_checkpoint:
            kwargs["checkpoint"] = args.segmenter_checkpoint
        segmenter = load_segmenter(args.segmenter, **kwargs)
    built, stats = build_reasoning_dataset(
        dataset,
        teacher,
        segmenter,
        iou_threshold=args.iou_threshold,
        num_candidates=args.num_candidates,
        use_known_expressions=args.use_known_expressions,
        batch_size=args.batch_size,
    )
    built.save_to_disk(args.out)
    report = stats.to_dict()
    Path(args.out, "build_stats.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return stats


def main(argv: Sequence[str] | None = None) -> BuildStats:
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(ReasoningArguments)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(args=argv)
    return run(args)


if __name__ == "__main__":
    main()
