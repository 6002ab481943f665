"""The transformers engine on a tiny random Llama: exact greedy output, continuous batching, the adapter LRU."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from engines import GREEDY, Reader, chunks, generate, request, tokens
from serving import wait_for

from adapterctl.serve.engines.transformers import attention

from adapterctl.serve.engines.transformers.kernels import sgmv
from adapterctl.serve.engines.base import AdapterLoadFailed, AdapterSpec, GenerationFailed, Sampling
from adapterctl.serve.engines.transformers.lora import AdapterWeights, MultiLoRALinear, SharedPlan, plan
from adapterctl.serve.engines.transformers.slots import State
from adapterctl.serve.engines.transformers.textstream import TextStream
from adapterctl.serve.engines.transformers.engine import TransformersEngine

PROMPTS = ["Hello there, how are you", "The capital of France is", "1 2 3 4 5 6 7 8 9 10", "Write a poem"]


@pytest.fixture(scope="module")
def engine(tiny_base: Path) -> Iterator[TransformersEngine]:
    built = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_loaded=4, max_batch=8)
    yield built
    asyncio.run(built.close())


def lora_bytes(engine: TransformersEngine) -> int:
    """Memory the engine's LoRA layers hold for adapter weights."""
    return sum(layer.a.nbytes + layer.b.nbytes for layer in engine._layers.values())


def peft_generate(base: Path, adapter: AdapterSpec | None, prompt: str, tokens: int, quantize: str = "none") -> str:
    """Greedy text from plain transformers + PEFT `generate`, the reference the engine must match."""
    from adapterctl.core.precision import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=quantization_config(quantize, torch.float32)
    )
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter.path)
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize(
    ("slots", "gathered"),
    [
        ([0, 1, 2, 3], False),
        ([3, 1, 1, 0, 1, 3], False),
        ([1, 1, 1, None, 0, 3], False),
        ([2] * 20 + [0, 3], True),  # one busy adapter: its rows are split so that groups are alike
        ([3, None, 3], True),
        ([None, None], None),
    ],
)
@pytest.mark.parametrize("per_row", [3, 1])  # 1: a decode pass, which the compiled kernel runs
def test_each_row_gets_its_own_adapter_in_either_layout(slots, gathered, per_row, monkeypatch):
    torch.manual_seed(0)
    rows = SharedPlan()
    layer = MultiLoRALinear(torch.nn.Linear(16, 8), rows)
    pairs = [(torch.randn(16, rank), torch.randn(rank, 8)) for rank in (2, 4, 3, 1)]
    for slot, (a, b) in enumerate(pairs):
        layer.put(slot, a, b)
    x = torch.randn(len(slots), per_row, 16)
    rows.plan = plan(slots, tokens=per_row)
    assert (rows.plan is None) if gathered is None else (rows.plan.slots is not None) == gathered
    if rows.plan is not None:
        assert (rows.plan.segments is not None) == (per_row == 1) and sgmv.available()
    calls, kernel = [], sgmv.apply
    monkeypatch.setattr(sgmv, "apply", lambda *args: calls.append(kernel(*args)))  # counts its calls, then runs it
    with torch.inference_mode():
        lora = [0 if s is None else x[i] @ pairs[s][0] @ pairs[s][1] for i, s in enumerate(slots)]
        expected = torch.stack([layer.base_layer(x[i]) + update for i, update in enumerate(lora)])
        torch.testing.assert_close(layer(x), expected)
    assert len(calls) == (per_row == 1 and rows.plan is not None)


@pytest.mark.parametrize("kernel", [True, False], ids=["attention-kernel", "torch-attention"])
def test_greedy_output_is_peft_generate_token_for_token(engine, lora, tiny_base, kernel, monkeypatch):
    if not kernel:  # as where no C compiler works
        monkeypatch.setattr(attention, "fits", lambda *args: False)
    calls, decode = [], attention.decode
    monkeypatch.setattr(attention, "decode", lambda *args: (calls.append(1), decode(*args))[1])
    adapters = [None, lora(1), lora(2, r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True)]
    for adapter, prompt in zip(adapters, PROMPTS, strict=False):
        expected = peft_generate(tiny_base, adapter, prompt, GREEDY.max_tokens)
        assert generate(engine, [(adapter, prompt, GREEDY, 0)]) == [expected]
    assert bool(calls) == kernel


def test_nf4_base_gives_what_peft_gives_on_the_same_nf4_model(lora, tiny_base):
    nf4 = TransformersEngine(tiny_base, model_id="tiny", quantize="nf4", max_batch=4)
    try:
        adapter = lora(3, target_modules="all-linear")
        expected = [peft_generate(tiny_base, a, PROMPTS[0], GREEDY.max_tokens, "nf4") for a in (None, adapter)]
        assert generate(nf4, [(None, PROMPTS[0], GREEDY, 0), (adapter, PROMPTS[0], GREEDY, 0)]) == expected
    finally:
        asyncio.run(nf4.close())


def passes_wider_than(engine: TransformersEngine, rows: int) -> int:
    """ENGINE's forward passes so far that held more than ROWS rows."""
    return sum(count for width, count in engine.status().passes.items() if width > rows)


def test_mixed_batch_gives_each_request_what_it_gets_alone(engine, lora, monkeypatch):
    adapters = [None, lora(1), lora(2, r=8, lora_alpha=4, target_modules="all-linear", use_rslora=True), lora(4)]
    jobs = [(a, p, GREEDY, 0.02 * i) for i, (a, p) in enumerate((a, p) for a in adapters for p in PROMPTS)]
    alone = [generate(engine, [job[:3] + (0,)])[0] for job in jobs]
    assert len(set(alone)) > len(PROMPTS)  # the adapters really change the answers
    # The first pass with running rows is held until every request has arrived, so the later ones join a running batch.
    gate, original = threading.Event(), engine._runner._pass
    monkeypatch.setattr(engine._runner, "_pass", lambda rows, parts: (rows and gate.wait(60), original(rows, parts))[1])

    def all_in() -> bool:
        status = engine.status()
        return status.running + status.waiting == len(jobs)

    threading.Thread(target=lambda: (wait_for(all_in, 60, "every job to be queued"), gate.set()), daemon=True).start()
    wide = passes_wider_than(engine, 4)
    assert generate(engine, jobs) == alone  # staggered: requests join a batch that is already running
    assert passes_wider_than(engine, 4) > wide  # they did share passes: rows of several adapters in one


def test_a_short_request_joins_the_running_batch_and_finishes_first(engine, lora):
    long = Sampling(max_tokens=300, temperature=0, ignore_eos=True)
    short = Sampling(max_tokens=3, temperature=0, ignore_eos=True)

    async def run() -> tuple[int, int]:
        first = Reader(engine, request(engine, PROMPTS[0], lora(1), long))
        await first.started.wait()
        await chunks(engine, request(engine, PROMPTS[1], lora(4), short))
        at_short_end = first.tokens  # read as they came: its chunks of the same steps came before the short end
        await first.result()
        return at_short_end, first.tokens

    at_short_end, total = asyncio.run(run())
    assert at_short_end < 100 and total == 300


def once_parked(engine: TransformersEngine) -> dict[int, int]:
    """The engine's passes by rows per pass, once one generation is parked and it runs nothing else."""
    wait_for(lambda: engine.parked == 1 and engine.status().running == 1, 20, "a generation to be parked")
    return dict(engine.status().passes)


def test_a_generation_its_reader_leaves_unread_pauses_then_goes_on_where_it_was(engine, lora):
    from adapterctl.serve.engines.transformers.generation import UNREAD

    long = Sampling(max_tokens=40, temperature=0, ignore_eos=True)
    jobs = [(lora(1), PROMPTS[0]), (lora(2), PROMPTS[1]), (None, PROMPTS[2])]
    expected = generate(engine, [(adapter, prompt, long, 0) for adapter, prompt in jobs])

    async def run() -> tuple[list[str], dict[int, int], dict[int, int], dict[int, int]]:
        start = dict(engine.status().passes)
        slow = engine.generate(request(engine, jobs[0][1], jobs[0][0], long))
        texts = [(await anext(slow)).text]  # one chunk read, then none for a while
        parked = await asyncio.to_thread(once_parked, engine)
        others = [Reader(engine, request(engine, prompt, adapter, long)) for adapter, prompt in jobs[1:]]
        await asyncio.gather(*(other.result() for other in others))
        after_others = dict(engine.status().passes)
        texts += [chunk.text async for chunk in slow]  # read at last: it goes on
        texts = ["".join(texts)] + [other.text for other in others]
        return texts, start, parked, after_others

    texts, start, parked, after_others = asyncio.run(run())
    assert texts == expected  # parked and moved in the cache, then resumed: the same greedy text
    alone = parked.get(1, 0) - start.get(1, 0)
    assert alone <= UNREAD + 2  # its prefill, then decode passes until UNREAD chunks waited: then it sat out
    assert after_others.get(3, 0) == parked.get(3, 0)  # the two others ran without it while it was parked
    assert engine.status().running == 0 and engine.status().kv_cache_usage == 0


def test_a_parked_generation_whose_reader_leaves_frees_its_row(engine, lora):
    long = Sampling(max_tokens=200, temperature=0, ignore_eos=True)

    async def run() -> int:
        slow = engine.generate(request(engine, PROMPTS[3], lora(3), long))
        await anext(slow)
        await asyncio.to_thread(once_parked, engine)
        held = engine.status().running
        await slow.aclose()  # as the server does when the client hangs up or the stall timer fires
        return held

    assert asyncio.run(run()) == 1
    wait_for(lambda: not engine.status().running, 4, "its row to be freed")
    assert engine.status().running == 0 and engine.status().kv_cache_usage == 0 and engine.parked == 0


def test_lru_keeps_max_loaded_idle_and_a_batch_runs_an_adapter_per_row_beyond_it(tiny_base, lora):
    small = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_loaded=2, max_batch=4)
    try:
        adapters = [lora(10 + i) for i in range(5)]
        assert asyncio.run(small.load(adapters[0])) is True and asyncio.run(small.load(adapters[0])) is False
        assert asyncio.run(small.load(adapters[1])) is True
        slots = lora_bytes(small)
        expected = [generate(small, [(a, PROMPTS[0], GREEDY, 0)])[0] for a in adapters]
        loaded = asyncio.run(small.loaded())
        assert len(loaded) == 2 and adapters[0].key not in loaded
        assert small.status().evictions == 3 and small.status().loads == 5
        assert lora_bytes(small) == slots  # five adapters served, memory for two
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, AdapterWeights)], "read weights are still held"
        # Three long generations on three adapters, more than max_loaded: a fourth adapter joins their batch at once.
        long = Sampling(max_tokens=300, temperature=0, ignore_eos=True)

        async def fourth_joins() -> tuple[list[str], int]:
            holders = [Reader(small, request(small, PROMPTS[0], a, long)) for a in adapters[:3]]
            for holder in holders:
                await holder.started.wait()  # all three run
            fourth = Reader(small, request(small, PROMPTS[0], adapters[3], GREEDY))
            await fourth.started.wait()
            done_by_then = max(h.tokens for h in holders)
            return [await r.result() for r in (*holders, fourth)], done_by_then

        texts, done_by_then = asyncio.run(fourth_joins())
        assert done_by_then < long.max_tokens  # its first token came while all three still ran
        assert texts[3] == expected[3] and all(texts[i].startswith(expected[i]) for i in range(3))
        # The rows leave at the end of the step that sent their last chunk.
        wait_for(lambda: not small.status().running, 10, "the rows to leave")
        assert len(small.status().loaded) == 2  # once idle, those beyond max_loaded went
        assert lora_bytes(small) == 2 * slots  # memory for the four a batch used at once
    finally:
        asyncio.run(small.close())


def test_loads_waiting_for_the_worker_hold_no_thread_other_requests_need(engine, lora):
    adapters = [lora(60 + i) for i in range(4)]

    async def run() -> tuple[bool, list[bool]]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))  # fewer threads than waiting loads
        with engine.paused():  # a fault point: the worker holds at a step boundary, before it reads any adapter
            loads = [asyncio.create_task(engine.load(adapter)) for adapter in adapters]
            while len(engine._slots.in_state(State.READING)) < 4:  # all four asked for, waiting for the worker
                await asyncio.sleep(0.001)
            # Tokenizing (a request's work on the executor) goes on while all four wait.
            ids = await asyncio.wait_for(asyncio.to_thread(engine.encode, PROMPTS[0]), 10)
            waited = bool(ids) and not any(load.done() for load in loads)
        return waited, await asyncio.gather(*loads)

    waited, answers = asyncio.run(run())
    assert waited and answers == [True] * 4
    assert set(asyncio.run(engine.loaded())) >= {adapter.key for adapter in adapters}


class Clock:
    """The engine's `time` while a test runs: seconds pass only when the test moves them on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now


def test_a_burst_of_loads_is_read_a_budget_per_step_while_rows_run(engine, lora, monkeypatch):
    from adapterctl.serve.engines.transformers import engine as module

    clock, events, read, original = Clock(), [], engine._read, engine._runner._pass

    def timed_read(spec):  # each read takes 0.6 of the budget on the engine's clock: two fit in one boundary, not three
        events.append("read")
        clock.now += 0.6 * module.LOAD_BUDGET
        return read(spec)

    monkeypatch.setattr(module, "time", clock)  # steps take no time: the budget is LOAD_BUDGET, whatever the machine
    monkeypatch.setattr(engine, "_read", timed_read)
    monkeypatch.setattr(engine._runner, "_pass", lambda rows, parts: (events.append("pass"), original(rows, parts))[1])
    adapters = [lora(70 + i) for i in range(3)]

    async def run() -> list[bool]:
        holder = Reader(engine, request(engine, PROMPTS[0], None, Sampling(max_tokens=1000, ignore_eos=True)))
        await holder.started.wait()
        with engine.paused():  # a fault point: all three are asked for at one step boundary while a row runs
            assert engine.status().running == 1
            loads = [asyncio.create_task(engine.load(adapter)) for adapter in adapters]
            while len(engine._slots.in_state(State.READING)) < 3:
                await asyncio.sleep(0.001)
            events.clear()
        answers = await asyncio.gather(*loads)
        await engine.abort(holder.request.request_id)
        await holder.result()
        return answers

    assert asyncio.run(run()) == [True] * 3
    # At the boundary two reads fill the budget; a pass; the third read.
    assert events[:4] == ["read", "read", "pass", "read"]


def test_unload_refuses_an_unknown_key_and_drops_a_loaded_one(engine, lora):
    asyncio.run(engine.load(lora(1)))
    assert asyncio.run(engine.unload(lora(1).key)) is True and lora(1).key not in asyncio.run(engine.loaded())
    assert asyncio.run(engine.unload("nobody@v1.0.0")) is False


def test_adapters_the_engine_cannot_apply_are_rejected_with_the_reason(engine, lora, tmp_path):
    def rejected(adapter: AdapterSpec) -> str:
        with pytest.raises(AdapterLoadFailed) as info:
            asyncio.run(engine.load(adapter))
        assert info.value.key == adapter.key
        return str(info.value)

    assert "rank 128 is above this server's maximum rank 64" in rejected(lora(5, r=128))
    assert "use_dora=True" in rejected(lora(6, use_dora=True))
    assert "lm_head" in rejected(lora(7, target_modules=["lm_head"]))
    base_alone = generate(engine, [(None, PROMPTS[0], GREEDY, 0)])
    pickled = tmp_path / "pickled"
    shutil.copytree(lora(1).path, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "safetensors weights only" in rejected(AdapterSpec("p", "v1.0.0", pickled))
    assert generate(engine, [(None, PROMPTS[0], GREEDY, 0)]) == base_alone  # still serving, unchanged


def test_a_failing_adapter_fails_its_request_only(engine, lora, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(lora(1).path, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 2}))  # weights no longer fit

    async def run() -> tuple[BaseException | None, str]:
        bad = Reader(engine, request(engine, PROMPTS[0], AdapterSpec("broken", "v1.0.0", broken)))
        good = Reader(engine, request(engine, PROMPTS[0]))
        error = None
        try:
            await bad.result()
        except AdapterLoadFailed as exc:
            error = exc
        return error, await good.result()

    error, text = asyncio.run(run())
    assert "do not fit" in str(error) and text


def test_seed_makes_sampling_reproducible_and_stop_and_length_end_it(engine, lora):
    sampled = Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    first, again = generate(engine, [(lora(1), PROMPTS[3], sampled, 0), (lora(1), PROMPTS[3], sampled, 0.01)])
    assert first == again

    async def finish(sampling: Sampling) -> tuple[str, str | None, int]:
        found = await chunks(engine, request(engine, PROMPTS[0], None, sampling))
        assert all(c.finish_reason is None for c in found[:-1])
        return "".join(c.text for c in found), found[-1].finish_reason, tokens(found)

    text, reason, count = asyncio.run(finish(GREEDY))
    assert reason == "length" and count == GREEDY.max_tokens
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = Sampling(max_tokens=12, temperature=0, stop=(stop,), ignore_eos=True)
    stopped, reason, _ = asyncio.run(finish(cut))
    assert reason == "stop" and stopped == text[: text.index(stop)]


def test_text_stream_waits_for_whole_characters_and_cuts_stop_strings_across_tokens(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    text = "Señor 🦜 says: the end is near. More"
    ids = tokenizer.encode(text)
    stream = TextStream(tokenizer, ("end is", "zzz"))
    pieces, stopped = [], False
    for token in ids:
        piece, stopped = stream.push(token)
        assert "\ufffd" not in piece
        pieces.append(piece)
        if stopped:
            break
    assert stopped and "".join(pieces) == "Señor 🦜 says: the "
    plain = TextStream(tokenizer, ())
    assert "".join(plain.push(t)[0] for t in ids) + plain.rest() == text


@pytest.mark.slow
def test_on_the_embedded_nf4_model_a_mixed_batch_matches_peft_generate(embedded_base, tmp_path):
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(embedded_base)
        config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        peft_model = get_peft_model(model, config)
        for name, weight in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a small random B makes a real, coherent change
                weight.data.normal_(0, 0.02)
        peft_model.save_pretrained(tmp_path / f"a{seed}")
        adapters.append(AdapterSpec(f"a{seed}", "v1.0.0", tmp_path / f"a{seed}"))
    prompt = "The three primary colours are"
    sampling = Sampling(max_tokens=16, temperature=0, ignore_eos=True)
    expected = [peft_generate(embedded_base, a, prompt, 16, "nf4") for a in [None, *adapters]]
    assert len(set(expected)) == 3
    engine = TransformersEngine(embedded_base, model_id="smollm2", quantize="nf4", max_batch=4)
    try:
        assert generate(engine, [(a, prompt, sampling, 0.01 * i) for i, a in enumerate([None, *adapters])]) == expected
    finally:
        asyncio.run(engine.close())


def test_rank_and_alpha_patterns_and_rslora_are_applied_as_peft_applies_them(engine, lora, tiny_base, tmp_path):
    patterns = {
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "rank_pattern": {"q_proj": 8, r"layers\.1\.self_attn\.v_proj": 2},
        "alpha_pattern": {"v_proj": 32, "o_proj": 1},
    }
    for seed, settings in ((10, patterns), (11, {**patterns, "use_rslora": True})):  # a seed each: a key each
        adapter = lora(seed, **settings)
        expected = peft_generate(tiny_base, adapter, PROMPTS[1], GREEDY.max_tokens)
        assert generate(engine, [(adapter, PROMPTS[1], GREEDY, 0)]) == [expected], settings
    # The patterns matter here: the same weights with one alpha for all answer otherwise.
    plain = tmp_path / "plain"
    shutil.copytree(lora(10, **patterns).path, plain)
    config = json.loads((plain / "adapter_config.json").read_text())
    (plain / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {}}))
    unpatterned = generate(engine, [(AdapterSpec("plain", "v1.0.0", plain), PROMPTS[1], GREEDY, 0)])
    assert unpatterned != [peft_generate(tiny_base, lora(10, **patterns), PROMPTS[1], GREEDY.max_tokens)]


def test_a_rejected_load_never_holds_a_later_request_or_another_load(engine, lora, tmp_path):
    zero = tmp_path / "zero"
    shutil.copytree(lora(1).path, zero)
    config = json.loads((zero / "adapter_config.json").read_text())
    (zero / "adapter_config.json").write_text(json.dumps({**config, "r": 0, "lora_alpha": "sixteen"}))
    spec = AdapterSpec("zero", "v1.0.0", zero)

    async def run() -> tuple[list[BaseException | bool], list[str]]:
        running = Reader(engine, request(engine, PROMPTS[2], lora(2)))
        await asyncio.sleep(0)  # it is queued
        loads = await asyncio.gather(*[engine.load(spec) for _ in range(3)], return_exceptions=True)
        base = Reader(engine, request(engine, PROMPTS[0]))
        texts = [await asyncio.wait_for(r.result(), 60) for r in (base, running)]  # a held request times out
        return loads, texts

    loads, texts = asyncio.run(run())
    assert all(isinstance(e, AdapterLoadFailed) and "'r' is 0" in str(e) for e in loads), loads
    assert texts == generate(engine, [(None, PROMPTS[0], GREEDY, 0), (lora(2), PROMPTS[2], GREEDY, 0)])


def test_a_prompt_the_model_fails_on_fails_alone_and_its_batch_is_prefilled_again(engine, monkeypatch, caplog):
    good_ids, bad_ids = engine.encode(PROMPTS[0]), engine.encode(PROMPTS[2])
    poison = next(token for token in bad_ids if token not in good_ids)
    forward, passes = engine._runner.forward, []

    def failing(ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """A fault point: the model fails on any prompt holding POISON, as it could on an input nobody foresaw."""
        passes.append(ids.shape[1])
        if ids.shape[1] > 1 and bool((ids == poison).any()):
            raise RuntimeError("the model failed on this prompt")
        return forward(ids, positions)

    alone = generate(engine, [(None, PROMPTS[0], GREEDY, 0)])
    monkeypatch.setattr(engine._runner, "forward", failing)

    async def run() -> tuple[BaseException | None, str]:
        with engine.paused():  # a fault point: the worker waits until both are queued, so that one prefill takes both
            good, bad = Reader(engine, request(engine, good_ids)), Reader(engine, request(engine, bad_ids))
            while engine.status().waiting < 2:
                await asyncio.sleep(0)
        try:
            await bad.result()
        except GenerationFailed as exc:
            return exc, await good.result()
        return None, await good.result()

    error, text = asyncio.run(run())
    assert str(error) == "The engine failed on this request (RuntimeError); see the server log." and [text] == alone
    assert "the model failed on this prompt" in caplog.text  # the cause went to the log
    assert passes[:3] == [len(good_ids) + len(bad_ids), len(good_ids), len(bad_ids)]  # together, then each alone


def test_a_closed_engine_answers_a_generation_at_once_instead_of_holding_it(tiny_base: Path) -> None:
    from adapterctl.serve.engines.base import EngineUnavailable
    from adapterctl.serve.engines.transformers.engine import TransformersEngine

    engine = TransformersEngine(tiny_base, model_id="tiny", quantize="none", max_batch=2)
    asyncio.run(engine.close())  # as a server does when it stops
    with pytest.raises(EngineUnavailable, match="The engine was closed"):
        asyncio.run(chunks(engine, request(engine, "Hello", sampling=GREEDY)))
