"""What OpenAI's API lets clients ask, over real HTTP with the official client: log-probabilities (equal to PEFT's
own), echo, prompts as lists and token ids, n and best_of, and a 400 for what the server does not do."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from engines import VLLM
from serving import Server, events, metric, serving_alpha, wait_for

PROMPTS = ["The quick brown fox", "Once upon a time"]


@dataclass
class Served:
    server: Server
    adapter: Path

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def engine(self) -> Any:
        return self.server.engine

    @property
    def client(self) -> openai.OpenAI:
        return self.server.client

    def post(self, path: str, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", json=body, timeout=120)


@pytest.fixture(scope="module", params=["transformers", VLLM])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, make_adapter: Any
) -> Iterator[Served]:
    """The same server on each engine: every API feature works on both."""
    with serving_alpha(request, tmp_path_factory.mktemp("openai"), tiny_base, make_adapter(1)) as server:
        yield Served(server, make_adapter(1))


@pytest.fixture(scope="module")
def peft_logprobs(tiny_base: Path, served: Served) -> Any:
    """log_softmax of plain transformers + PEFT over token ids: the reference the server's values must equal."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), served.adapter).eval()

    def run(ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)

    return run


def test_completion_logprobs_are_peft_log_softmax_whole_and_streamed(served: Served, peft_logprobs: Any) -> None:
    answer = served.client.completions.create(
        model="alpha", prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True}
    )
    logprobs = answer.choices[0].logprobs
    ids = served.engine.encode(PROMPTS[0])
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        row = peft_logprobs(ids)[-1]  # PEFT's greedy continuation, one token at a time
        best = row.topk(3)
        ids.append(int(best.indices[0]))
        assert token == served.engine.token_texts([ids[-1]])[0]
        assert value == pytest.approx(float(best.values[0]), abs=1e-4)
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert logprobs.text_offset[0] == len(PROMPTS[0]) and len(logprobs.text_offset) == 6

    with served.client.completions.create(
        model="alpha",
        prompt=PROMPTS[0],
        max_tokens=6,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
        stream=True,
    ) as stream:
        chunks = list(stream)
    streamed = [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert streamed == logprobs.token_logprobs


def test_echo_gives_every_prompt_tokens_logprob_as_lm_eval_reads_it(served: Served, peft_logprobs: Any) -> None:
    ids = served.engine.encode(PROMPTS[1])
    body = {"model": "alpha", "prompt": [ids], "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True}
    answer = served.post("/v1/completions", **body).json()
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    assert choice["text"].startswith(served.engine.decode(ids))
    assert len(logprobs["token_logprobs"]) == len(ids) + 1 and logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    reference = peft_logprobs(ids)
    expected = [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert logprobs["token_logprobs"][1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(top) == 1 for top in logprobs["top_logprobs"][1:])
    assert answer["usage"]["prompt_tokens"] == len(ids)
    # As vLLM: the first prompt token is named though unscored, and the tokens joined spell the text at their offsets.
    tokens, offsets = logprobs["tokens"], logprobs["text_offset"]
    assert tokens[0] == "Once" and "".join(tokens) == choice["text"]
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))] and offsets[:2] == [0, 4]


def test_a_chat_stream_opens_with_its_first_token_not_on_acceptance(served: Served, monkeypatch: Any) -> None:
    """The role chunk waits for the engine's first token, as vLLM's does, so a client's TTFT is the model's."""
    gate, arrived = threading.Event(), []
    generate = served.engine.generate

    async def held(request: Any) -> Any:
        await asyncio.to_thread(gate.wait, 60)  # the engine holds the request before its first token
        async for chunk in generate(request):
            yield chunk

    monkeypatch.setattr(served.engine, "generate", held)
    body = {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}

    def read() -> None:
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    arrived.append((time.monotonic(), line))

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(1.0)
    assert arrived == []  # accepted, streaming headers sent, no chunk yet
    released = time.monotonic()
    gate.set()
    reader.join(60)
    first_at, first = arrived[0]
    assert first_at >= released and json.loads(first[6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert arrived[-1][1] == "data: [DONE]"


def test_chat_logprobs_in_openais_shape(served: Served) -> None:
    chat = [{"role": "user", "content": "Say something."}]
    answer = served.client.chat.completions.create(
        model="alpha",
        messages=chat,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == answer.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 2 and token.logprob == pytest.approx(token.top_logprobs[0].logprob)
        assert token.bytes == list(token.token.encode())
    plain = served.client.chat.completions.create(model="alpha", messages=chat, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


def test_prompts_as_lists_and_token_ids_answer_one_choice_each_in_order(served: Served) -> None:
    def alone(prompt: Any) -> str:
        return (
            served.client.completions.create(model="alpha", prompt=prompt, max_tokens=5, temperature=0).choices[0].text
        )

    ids = [served.engine.encode(p) for p in PROMPTS]
    expected = [alone(p) for p in PROMPTS]
    assert [alone(i) for i in ids] == expected  # token ids mean the same as their text
    for prompt in (PROMPTS, ids):
        answer = served.client.completions.create(model="alpha", prompt=prompt, max_tokens=5, temperature=0)
        assert [c.index for c in answer.choices] == [0, 1] and [c.text for c in answer.choices] == expected
        assert answer.usage.prompt_tokens == sum(len(i) for i in ids)
    streamed = served.post("/v1/completions", model="alpha", prompt=PROMPTS, max_tokens=5, temperature=0, stream=True)
    texts = ["", ""]
    for event in events(streamed):
        if event != "[DONE]":
            texts[event["choices"][0]["index"]] += event["choices"][0]["text"]
    assert texts == expected


def test_n_choices_each_with_its_own_seed_and_best_of_keeps_the_likeliest(served: Served) -> None:
    sampled = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "ignore_eos": True}
    answer = served.post("/v1/completions", **sampled, n=3, seed=40).json()
    texts = [c["text"] for c in answer["choices"]]
    alone = [served.post("/v1/completions", **sampled, seed=40 + j).json()["choices"][0]["text"] for j in range(3)]
    assert texts == alone and len(set(texts)) > 1
    scored = [
        served.post("/v1/completions", **sampled, seed=40 + j, logprobs=0).json()["choices"][0]["logprobs"]
        for j in range(3)
    ]
    means = [sum(s["token_logprobs"]) / len(s["token_logprobs"]) for s in scored]
    best = served.post("/v1/completions", **sampled, n=1, best_of=3, seed=40).json()["choices"]
    assert [c["text"] for c in best] == [alone[means.index(max(means))]]


@pytest.mark.parametrize(
    ("extra", "param", "message"),
    [
        ({"temprature": 0.5}, "temprature", "Extra inputs are not permitted"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "Extra inputs are not permitted"),
        ({"response_format": {"type": "yaml"}}, "response_format", "'yaml' is not one of text, json_object"),
        ({"suffix": "end"}, "suffix", "suffix is not supported"),
        ({"logprobs": 21}, "logprobs", "less than or equal to 20"),
        ({"n": 2, "best_of": 1}, "best_of", "best_of (1) must be at least n (2)"),
        ({"best_of": 2, "stream": True}, "best_of", "cannot be streamed"),
        ({"prompt": []}, "prompt", "empty list"),
    ],
)
def test_what_the_server_does_not_do_is_a_400_naming_the_field(
    served: Served, extra: dict, param: str, message: str
) -> None:
    response = served.post("/v1/completions", **{"model": "alpha", "prompt": "x", "max_tokens": 2, **extra})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"]


def test_harmless_metadata_is_accepted(served: Served) -> None:
    body = {"model": "alpha", "prompt": "x", "max_tokens": 2, "user": "u-1", "metadata": {"run": "7"}, "store": False}
    assert served.post("/v1/completions", **body).status_code == 200


def test_lm_eval_with_its_default_settings_runs_a_loglikelihood_and_a_generation_task(
    served: Served, tmp_path: Path
) -> None:
    """The real lm-evaluation-harness CLI, `local-completions` with defaults, on two small tasks shipped here."""
    tasks = Path(__file__).parents[2] / "lm_eval_tasks"
    out = tmp_path / "results"
    lm_eval = Path(sys.executable).with_name("lm_eval")
    proc = subprocess.run(
        [
            str(lm_eval),
            "run",
            "--model",
            "local-completions",
            "--model_args",
            f"model=alpha,base_url={served.url}/v1/completions",
            "--tasks",
            "adapters_mc,adapters_gen",
            "--include_path",
            str(tasks),
            "--output_path",
            str(out),
        ],
        cwd=tasks,  # the tasks name their data files relative to here
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "remote tokenizer" in proc.stderr.lower()  # it used the server's own tokenizer, downloaded nothing
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0 <= results["adapters_mc"]["acc,none"] <= 1 and "acc_stderr,none" in results["adapters_mc"]
    assert 0 <= results["adapters_gen"]["exact_match,none"] <= 1


def _greedy_ids(peft_logprobs: Any, ids: list[int], count: int, presence: float = 0.0) -> list[int]:
    """PEFT's greedy continuation, with OpenAI's presence penalty applied to tokens already generated."""
    out: list[int] = []
    for _ in range(count):
        row = peft_logprobs(ids + out)[-1].clone()
        if out:
            row[torch.tensor(sorted(set(out)))] -= presence
        out.append(int(row.argmax()))
    return out


def test_penalties_biases_and_stop_token_ids_act_as_openai_and_vllm_define_them(
    served: Served, peft_logprobs: Any
) -> None:
    ids = served.engine.encode(PROMPTS[0])
    body = {"model": "alpha", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    penalised = served.post("/v1/completions", **body, presence_penalty=2.0).json()["choices"][0]["text"]
    expected = _greedy_ids(peft_logprobs, ids, 8, presence=2.0)  # no token twice, as the penalty wants here
    assert penalised == served.engine.decode(expected) and len(set(expected)) == 8
    plain = _greedy_ids(peft_logprobs, ids, 8)
    assert penalised != served.engine.decode(plain)  # the penalty changed the answer

    favourite = served.engine.encode(" fox", add_special_tokens=False)[0]
    biased = served.post("/v1/completions", **body, logit_bias={str(favourite): 100}, logprobs=0).json()["choices"][0]
    assert biased["text"] == served.engine.decode([favourite] * 8)
    assert biased["logprobs"]["token_logprobs"][0] < -0.01  # logprobs are the model's own, before the bias

    stopped = served.post("/v1/completions", **body, presence_penalty=2.0, stop_token_ids=[expected[2]])
    choice = stopped.json()["choices"][0]
    assert choice["text"] == served.engine.decode(expected[:2]) and choice["finish_reason"] == "stop"

    vocabulary = served.engine.tokenizer_info()["vocab_size"]
    for extra, param in (
        ({"logit_bias": {str(vocabulary): 1}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ):
        response = served.post("/v1/completions", **body, **extra)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_metrics_per_version_and_tenant(served: Served) -> None:
    def value(name: str, **labels: str) -> float:
        return metric(served.url, name, **labels)

    before = value("adapters_model_requests_total", model="alpha@v1.0.0")
    answer = served.client.completions.create(model="alpha", prompt="x", max_tokens=3, temperature=0)
    assert value("adapters_model_requests_total", model="alpha@v1.0.0") == before + 1
    assert (
        value("adapters_model_tokens_total", model="alpha@v1.0.0", kind="completion") >= answer.usage.completion_tokens
    )
    assert value("adapters_model_request_seconds_count", model="alpha@v1.0.0") >= 1


def test_the_queue_under_vllms_names(served: Served, monkeypatch: Any) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    if served.engine.name != "transformers":
        pytest.skip("holds the transformers engine inside a decoding step, a fault point only that engine has")

    def samples(name: str) -> list[Any]:
        text = httpx.get(f"{served.url}/metrics").text
        return [s for f in text_string_to_metric_families(text) for s in f.samples if s.name == name]

    def value(name: str) -> float:
        return metric(served.url, name)

    # The worker is held inside its next pass with a running row: one request runs, a second one waits behind it.
    gate = threading.Event()
    original = served.engine._runner._pass
    monkeypatch.setattr(
        served.engine._runner, "_pass", lambda rows, parts: (rows and gate.wait(60), original(rows, parts))[1]
    )
    body = {"model": "alpha", "prompt": "x", "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True}
    with ThreadPoolExecutor(1) as pool:
        try:
            with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=120) as stream:
                # Held in a name: a dropped line iterator, once collected, closes the connection, and the server would
                # end the request (a client gone) before the worker holds it.
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: "))  # it runs now
                later = {**body, "stream": False, "model": "alpha@latest"}
                waiter = pool.submit(served.post, "/v1/completions", **later)
                wait_for(lambda: value("vllm:num_requests_waiting") == 1, 60, "the second request to queue")
                assert value("vllm:num_requests_running") == 1 and value("adapters_requests_waiting") == 1
                assert metric(served.url, "vllm:num_requests_running", model_name="tiny-llama") == 1
                assert 0 < metric(served.url, "vllm:kv_cache_usage_perc", model_name="tiny-llama") <= 1
                running, waiting, max_lora = _as_the_gateway_reads(samples("vllm:lora_requests_info"))
                # Every name a request was sent by: the bare one, another reference, the version itself.
                assert running == waiting == {"alpha", "alpha@latest", "alpha@v1.0.0"} and max_lora == 2
                gate.set()
        finally:
            gate.set()
        assert waiter.result().status_code == 200
    wait_for(lambda: value("vllm:num_requests_running") == 0, 10, "the batch to empty")


def _as_the_gateway_reads(samples: list[Any]) -> tuple[set[str], set[str], int]:
    """vllm:lora_requests_info as the Gateway API Inference Extension parses it: the sample of the largest value (the
    latest), adapter names split at commas, max_lora an integer."""
    latest = max(samples, key=lambda sample: sample.value).labels
    names = [{n for n in latest[label].split(",") if n} for label in ("running_lora_adapters", "waiting_lora_adapters")]
    return names[0], names[1], int(latest["max_lora"])


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "ok", "n"],
    "additionalProperties": False,
}


def test_structured_output_always_parses_and_validates_per_row_of_a_mixed_batch(served: Served) -> None:
    import jsonschema

    strict = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    jobs = [
        ({"model": "alpha", "prompt": "Person:", "response_format": strict, "seed": seed, "temperature": 1.0}, True)
        for seed in range(4)
    ]
    jobs += [({"model": "tiny-llama", "prompt": "Person:", "response_format": strict, "temperature": 0}, True)]
    jobs += [({"model": "alpha", "prompt": "Person:", "temperature": 0, "ignore_eos": True}, False)]
    plain_alone = served.post("/v1/completions", **jobs[-1][0], max_tokens=30).json()["choices"][0]["text"]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: served.post("/v1/completions", **job[0], max_tokens=60).json(), jobs))
    for (_, structured), answer in zip(jobs, answers, strict=True):
        choice = answer["choices"][0]
        if structured:
            assert choice["finish_reason"] == "stop", choice
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)
        else:
            assert choice["text"].startswith(plain_alone[:20])  # the unconstrained row in the same batch is unchanged
    # json_object: any object. A random model opens keys and never closes them, so biases (against '{"', for
    # '}') steer it; the grammar decides where each token may stand, so the answer is a whole object.
    (open_key,), (close,) = (served.engine.encode(t, add_special_tokens=False) for t in ('{"', "}"))
    chat = served.client.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "Give a JSON object."}],
        response_format={"type": "json_object"},
        logit_bias={str(open_key): -100, str(close): 100},
        max_tokens=30,
        temperature=0,
    )
    assert chat.choices[0].finish_reason == "stop", chat.choices[0].message.content
    assert isinstance(json.loads(chat.choices[0].message.content), dict)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}
    response = served.post("/v1/completions", model="alpha", prompt="x", response_format=bad)
    assert response.status_code == 400 and response.json()["error"]["param"] == "response_format"


def test_the_base_answers_to_its_id_and_folder_name_everywhere(served: Served, tiny_base: Path) -> None:
    folder = tiny_base.name
    assert served.client.models.retrieve(folder).id == folder
    chat = [{"role": "user", "content": "Hi"}]
    for model in ("tiny-llama", folder):
        assert served.client.chat.completions.create(model=model, messages=chat, max_tokens=2).choices
        assert served.client.completions.create(model=model, prompt="x", max_tokens=2).choices
        assert served.post("/tokenize", model=model, prompt="x").status_code == 200
    listed = {m.id: m.model_extra for m in served.client.models.list()}
    context = served.engine.context_length
    assert listed["tiny-llama"] == {"root": "tiny-llama", "parent": None, "max_model_len": context}
    assert listed["alpha"]["root"] == "alpha@v1.0.0" and listed["alpha"]["parent"] == "tiny-llama"
    assert listed["alpha"]["max_model_len"] == context


def test_a_base_folder_is_named_by_its_folder_and_the_hub_id_it_came_from(tmp_path: Path) -> None:
    from adapterctl.core.base import MARKER
    from adapterctl.serve.catalog.versions import base_names

    base = tmp_path / "smollm2-135m-instruct"
    base.mkdir()
    assert base_names(base) == ("smollm2-135m-instruct",)
    (base / MARKER).write_text(json.dumps({"hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    assert base_names(base) == ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
