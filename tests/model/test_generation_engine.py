"""The decode engine: continuous batching across adapters gives, for every sequence, exactly the
tokens of ``model.generate`` (through peft for an adapter) for that prompt alone, whatever shares
its steps; prompts prefilled in chunks; a cancelled sequence's slot serves the next one; stop
strings; seeded sampling independent of the batch; a full waiting room refuses."""

from pathlib import Path

import pytest

from models.adapters import base_weight_shapes, validate_adapter
from models.decoding.engine import GenSeq
from models.decoding.sampling import SamplingParams
from models.errors import Overloaded
from models.factory import create_backend
from models.spec import ModelSpec
from tests.conftest import STORYTELLER, greedy_reference, make_causal_adapter

PROMPTS = [
    "Once upon a time",
    "One day a little fox named Leo went to the school and",
    "<|user|>\nWrite a short story about a cat named Nora.</s>\n<|assistant|>\n",
    "The dog",
]
NEW = 24


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal-adapters")
    make_causal_adapter(root / "gen-a", seed=21)
    make_causal_adapter(root / "gen-b", seed=22, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
    return root


def load(store=None, adapters=(), **generation):
    spec = ModelSpec(id="storyteller", source=STORYTELLER, task="generate", generation=generation)
    b = create_backend(spec, "torch")
    b.load()
    for name in adapters:
        check = validate_adapter(name, [store], base_shapes=base_weight_shapes(Path(STORYTELLER)), task="generate", max_rank=64)
        b.add_adapter(name, check, "generate")
    return b


def run(engine, seqs, cancel_after=None):
    """Step until every sequence ended; ``cancel_after = (step, seq)`` cancels one on the way."""
    engine.admit(seqs)
    steps = 0
    while engine.busy:
        cancel = [cancel_after[1].id] if cancel_after and steps == cancel_after[0] else []
        engine.step(cancel)
        steps += 1
        assert steps < 2000
    return steps


def greedy(n=NEW):
    return SamplingParams(max_tokens=n, temperature=0.0)


def test_mixed_adapter_batches_equal_generate_per_sequence(store):
    b = load(store, ("gen-a", "gen-b"))
    plan = [(p, a) for p in PROMPTS for a in (None, "gen-a", "gen-b")]
    seqs = [GenSeq(b.encode_prompt(p), greedy(), a) for p, a in plan]
    run(b.engine, seqs)
    texts = set()
    for (p, a), s in zip(plan, seqs):
        ref = greedy_reference(s.prompt, NEW, adapter_dir=None if a is None else store / a)
        assert s.tokens == ref, f"{a} on {p!r}"
        texts.add((p, b.decode(s.tokens)))
    assert len(texts) > len(PROMPTS) + 2  # the adapters do change what is written


def test_chunked_prefill_and_late_joiners_keep_parity():
    b = load(step_tokens=5, max_running=3)  # prompts of 5-20 tokens prefill over several steps
    seqs = [GenSeq(b.encode_prompt(p), greedy(), None) for p in PROMPTS * 2]
    steps = run(b.engine, seqs)
    for s in seqs:
        assert s.tokens == greedy_reference(s.prompt, NEW)
    assert steps > NEW * 2  # three slots for eight sequences: they took turns


def test_a_cancelled_sequence_frees_its_slot_for_the_next():
    b = load(max_running=2)
    seqs = [GenSeq(b.encode_prompt(p), greedy(), None) for p in PROMPTS[:3]]
    run(b.engine, seqs, cancel_after=(3, seqs[0]))
    assert seqs[0].finish == "abort" and len(seqs[0].tokens) < NEW
    for s in seqs[1:]:  # the third waited for a slot, got the cancelled one's, and is exact
        assert s.finish in ("stop", "length")
        assert s.tokens == greedy_reference(s.prompt, NEW)


def test_stop_string_ends_the_text_before_it():
    b = load()
    prompt = b.encode_prompt(PROMPTS[0])
    full = b.decode(greedy_reference(prompt, NEW))
    stop = full.split()[3]  # a word in the middle of what greedy decoding writes
    s = GenSeq(prompt, SamplingParams(max_tokens=NEW, temperature=0.0, stop=(stop,)), None)
    deltas = []
    b.engine.admit([s])
    while b.engine.busy:
        deltas += [d for d in b.engine.step() if d.seq is s]
    text = "".join(d.text for d in deltas)
    assert s.finish == "stop" and text == full[: full.index(stop)]
    assert stop not in text


def test_seeded_sampling_does_not_depend_on_the_batch():
    b = load()
    params = SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.9, seed=7)
    alone = GenSeq(b.encode_prompt(PROMPTS[0]), params, None)
    run(b.engine, [alone])
    crowd = [GenSeq(b.encode_prompt(p), SamplingParams(max_tokens=NEW, temperature=1.0), None) for p in PROMPTS]
    again = GenSeq(b.encode_prompt(PROMPTS[0]), params, None)
    run(b.engine, crowd[:2] + [again] + crowd[2:])
    assert again.tokens == alone.tokens
    other = GenSeq(b.encode_prompt(PROMPTS[0]), SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.9, seed=8), None)
    run(b.engine, [other])
    assert other.tokens != alone.tokens


def test_a_full_waiting_room_refuses_new_sequences():
    b = load(max_running=1, max_waiting=1)  # one slot and one place to wait
    b.engine.admit([GenSeq([1, 5], greedy(), None) for _ in range(2)])
    with pytest.raises(Overloaded):
        b.engine.admit([GenSeq([1, 5], greedy(), None)])


def test_other_causal_lm_families_decode_exactly_as_generate(tmp_path):
    """A Qwen2 and a GPT-2 checkpoint (tiny, seeded, random weights; the storyteller's tokenizer)
    are served by the same engine with greedy tokens equal to ``model.generate``'s."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(STORYTELLER)
    torch.manual_seed(0)
    families = {
        "qwen2": Qwen2ForCausalLM(Qwen2Config(
            vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=True)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=256, n_embd=64, n_layer=2, n_head=2,
                                           bos_token_id=1, eos_token_id=2)),
    }
    for name, model in families.items():
        model.save_pretrained(tmp_path / name, safe_serialization=True)
        tok.save_pretrained(tmp_path / name)
        spec = ModelSpec(id=name, source=str(tmp_path / name), task="generate", generation={"step_tokens": 8})
        b = create_backend(spec, "torch")
        b.load()
        prompts = [tok(p)["input_ids"] for p in PROMPTS]
        seqs = [GenSeq(p, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), None) for p in prompts]
        run(b.engine, seqs)
        for p, s in zip(prompts, seqs):
            ref = model.eval().generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                        pad_token_id=0)[0, len(p):].tolist()
            assert s.tokens == ref, name


def test_a_request_arriving_during_a_prefill_pass_gets_its_own_before_the_decode_pass():
    b = load(step_tokens=16)
    e = b.engine
    passes = []  # (rows, tokens per row) of every forward pass, in order
    forward = e._forward
    e._forward = lambda first, rows, ids, qs: passes.append((len(rows), ids.shape[1])) or forward(first, rows, ids, qs)
    running = [GenSeq(b.encode_prompt(p), greedy(), None) for p in PROMPTS[:2]]
    e.admit(running)
    e.step()
    early = GenSeq(b.encode_prompt(PROMPTS[3]), greedy(), None)
    late = GenSeq(b.encode_prompt(PROMPTS[0]), greedy(), None)
    long = GenSeq(b.encode_prompt(" ".join([PROMPTS[1]] * 4)), greedy(), None)  # over one pass: chunked
    calls = []

    def intake():  # the server's: ``late`` arrives while ``early``'s prefill pass runs
        calls.append(len(passes))
        if len(calls) == 2:
            e.admit([late])
    firsts = []
    passes.clear()
    e.admit([early])
    e.step(early=lambda ds: firsts.extend(d.seq for d in ds), intake=intake)
    assert firsts == [early, late] and passes == [(1, len(early.prompt)), (1, len(late.prompt)), (4, 1)]
    passes.clear()
    e.admit([long])
    e.step(intake=lambda: None)
    assert len(long.prompt) > 2 * 16
    assert passes == [(1, 16), (4, 1)]  # one chunk, then the decode pass: no extra pass for it
    while e.busy:
        e.step(intake=lambda: None)
    for s in [*running, early, late, long]:
        assert s.tokens == greedy_reference(s.prompt, NEW)


def test_a_finished_sequence_is_replaced_by_one_move_not_a_shift():
    b = load()
    e = b.engine
    seqs = [GenSeq(b.encode_prompt(p), greedy(), None) for p in PROMPTS + PROMPTS[:2]]
    e.admit(seqs)
    e.step()
    moves = []
    move = e.cache.move
    e.cache.move = lambda m: moves.append(m) or move(m)
    e.step(cancel=[seqs[1].id])  # a hole in slot 1 of 0..5
    assert [(src, dst) for src, dst, _ in moves[0]] == [(5, 1)] and len(moves) == 1
    assert [s.slot for s in e.running] == list(range(5))
    while e.busy:
        e.step()
    for s in seqs[:1] + seqs[2:]:
        assert s.tokens == greedy_reference(s.prompt, NEW)


SHARED = "<|user|>\nWrite a short story about a "  # the chat template's start and the ask: 9+ tokens


def test_a_shared_prefix_is_reused_per_adapter_and_keeps_parity(store):
    b = load(store, ("gen-a", "gen-b"))
    first = [GenSeq(b.encode_prompt(SHARED + "dog named Tom."), greedy(), a) for a in (None, "gen-a")]
    run(b.engine, first)
    assert [s.reused for s in first] == [0, 0]  # nothing cached yet
    later = [GenSeq(b.encode_prompt(SHARED + "cat named Mia."), greedy(), a) for a in (None, "gen-a", "gen-b")]
    run(b.engine, later)
    block = b.engine.prefix.block
    assert later[0].reused >= block and later[1].reused >= block  # the template's KV, per adapter
    assert later[2].reused == 0  # gen-b never ran this prefix: another adapter's KV is not its own
    for s in first + later:
        assert s.reused < len(s.prompt)  # the last token is always computed: it gives the first output
        ref = greedy_reference(s.prompt, NEW, adapter_dir=None if s.adapter is None else store / s.adapter)
        assert s.tokens == ref, s.adapter


def test_an_adapter_reloaded_under_its_name_does_not_reuse_the_old_kv(store, tmp_path):
    b = load(store, ("gen-a",))
    prompt = b.encode_prompt(PROMPTS[2])
    run(b.engine, [GenSeq(prompt, greedy(), "gen-a")])
    make_causal_adapter(tmp_path / "gen-a", seed=99)  # other weights, the same name
    b.remove_adapter("gen-a")
    check = validate_adapter("gen-a", [tmp_path], base_shapes=base_weight_shapes(Path(STORYTELLER)),
                             task="generate", max_rank=64)
    b.add_adapter("gen-a", check, "generate")
    again = GenSeq(prompt, greedy(), "gen-a")
    run(b.engine, [again])
    assert again.reused == 0
    assert again.tokens == greedy_reference(prompt, NEW, adapter_dir=tmp_path / "gen-a")
    assert again.tokens != greedy_reference(prompt, NEW, adapter_dir=store / "gen-a")


def test_prefix_cache_off_computes_every_prompt_token():
    b = load(prefix_cache_mb=0)
    assert b.engine.prefix is None
    seqs = [GenSeq(b.encode_prompt(PROMPTS[2]), greedy(), None) for _ in range(2)]
    run(b.engine, seqs[:1])
    run(b.engine, seqs[1:])
    assert [s.reused for s in seqs] == [0, 0]
    assert seqs[1].tokens == seqs[0].tokens == greedy_reference(seqs[0].prompt, NEW)
