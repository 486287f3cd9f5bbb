"""Generation with the KV cache: incremental decoding equals the full forward, greedy generation equals
transformers' `generate`, sampling filters equal HF's warpers, the pure sampler, the CLI.

Chunk size 8 and floor_scale 4 (the tiny presets), so prompts and generations cross several chunk boundaries
and the NoPE temperature is live. Tolerance: PARITY_RTOL x max |logit| (float32, highest precision).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_reference import PARITY_RTOL, hf_model, ours_from_hf
from transformers.generation import logits_process as hf_warpers

from llama4_jax import TINY_MAVERICK, TINY_SCOUT
from llama4_jax.generate import (
    Generator,
    SamplingConfig,
    cache_shardings,
    filter_logits,
    forward_with_cache,
    init_cache,
    left_pad,
    sample_continuations,
)
from llama4_jax.generate import generator as generator_module

CONFIGS = {
    "scout_like": TINY_SCOUT.replace(num_hidden_layers=8),
    "maverick_like": TINY_MAVERICK.replace(num_hidden_layers=8),
}


@functools.partial(jax.jit, static_argnames=("graphdef", "prefill"))
def _logits_step(graphdef, state, cache, tokens, positions, prefill):
    model = nnx.merge(graphdef, state)
    hidden, cache = forward_with_cache(model, cache, tokens, positions, prefill=prefill)
    return model.logits(hidden), cache


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_logits(graphdef, state, tokens, positions, segment_ids):
    return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segment_ids)


def max_rel_error(ours, ref) -> float:
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_decoding_matches_full_forward(name):
    """Left-padded batch: prefill, then steps of 9, 1, 1, 1 and 8 tokens (crossing chunks of 8; a step
    longer than the ring of 7)."""
    config = CONFIGS[name]
    model = ours_from_hf(hf_model(config, seed=2), config)
    rng = np.random.default_rng(2)
    lengths, prompt_len, steps = (30, 19, 5), 32, (9, 1, 1, 1, 8)
    tokens, positions = left_pad([rng.integers(0, config.vocab_size, n) for n in lengths], prompt_len, 0)
    new = rng.integers(0, config.vocab_size, (len(lengths), sum(steps))).astype(np.int32)
    new_positions = np.asarray(lengths)[:, None] + np.arange(sum(steps))
    all_tokens, all_positions = np.concatenate([tokens, new], 1), np.concatenate([positions, new_positions], 1)
    valid = all_positions >= 0
    graphdef, state = nnx.split(model)
    ref = np.asarray(_full_logits(graphdef, state, all_tokens, np.maximum(all_positions, 0), valid.astype(np.int32)))
    cache = init_cache(config, len(lengths), 64)
    logits, cache = _logits_step(graphdef, state, cache, tokens, positions, True)
    outs, start = [logits], 0
    for size in steps:
        stop = start + size
        logits, cache = _logits_step(graphdef, state, cache, new[:, start:stop], new_positions[:, start:stop], False)
        outs.append(logits)
        start = stop
    ours = np.concatenate(outs, axis=1)
    assert max_rel_error(ours[valid], ref[valid]) <= PARITY_RTOL
    assert int(cache.length) == prompt_len + sum(steps)
    for spec, keys in zip(config.layer_specs, cache.keys):  # chunked layers: a ring of C - 1; global: all
        assert keys.shape[2] == (config.attention_chunk_size - 1 if spec.chunked else 64)
    if name == "scout_like":  # the padded rows compute what each prompt computes alone
        for row, n in enumerate(lengths):
            ids = all_tokens[row:row + 1, prompt_len - n:]
            alone = np.asarray(_full_logits(graphdef, state, ids, all_positions[row:row + 1, prompt_len - n:],
                                            np.ones_like(ids)))[0]
            assert max_rel_error(ours[row][valid[row]], alone) <= PARITY_RTOL


def test_greedy_generation_matches_transformers():
    """64 greedy tokens after a 13-token prompt: 77 positions, 10 chunks, temperature tuning from p = 3."""
    config = CONFIGS["scout_like"]
    hf = hf_model(config, seed=0, gain=2.0)  # logits up to ~9: top-1 margins far above the tolerance
    prompt = np.random.default_rng(1).integers(0, config.vocab_size, (1, 13))
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(prompt), max_new_tokens=64, do_sample=False, eos_token_id=None,
                          pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    expected = out.sequences[0, 13:].tolist()
    scores = torch.stack(out.scores)[:, 0].numpy()
    top2 = np.sort(scores, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 50 * PARITY_RTOL * np.abs(scores).max(), "ties-prone config"
    assert len(set(expected)) > 32, "degenerate (repetitive) greedy output"
    ours = Generator(ours_from_hf(hf, config)).generate([prompt[0].tolist()], max_new_tokens=64)[0]
    assert ours == expected


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (0.6, 0, 0.9), (1.3, 10, 0.5)])
def test_sampling_filters_match_transformers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32) * 3
    ref = torch.as_tensor(logits)
    ref = hf_warpers.TemperatureLogitsWarper(temperature)(None, ref)
    if top_k:
        ref = hf_warpers.TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1:
        ref = hf_warpers.TopPLogitsWarper(top_p)(None, ref)
    ours = np.asarray(filter_logits(jnp.asarray(logits), SamplingConfig(temperature=temperature, top_k=top_k,
                                                                        top_p=top_p)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref.numpy()))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref.numpy()[~np.isinf(ours)], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    config = TINY_SCOUT
    return config, ours_from_hf(hf_model(config, seed=3, gain=2.0), config)


def test_sample_continuations_inside_jit(tiny):
    """Greedy: the pure sampler equals the streaming Generator on left-padded prompts; a stop token ends a
    row; sampling depends only on the key."""
    config, model = tiny
    prompts = [[5, 17, 250, 3, 99, 7, 41], [300, 12, 8]]
    reference = Generator(model).generate(prompts, max_new_tokens=12)
    tokens, mask = left_pad(prompts, 8, 0)
    graphdef, params = nnx.split(model)

    @functools.partial(jax.jit, static_argnames=("sampling", "stop_tokens"))
    def rollout(params, tokens, prompt_mask, key, sampling, stop_tokens):
        return sample_continuations(nnx.merge(graphdef, params), tokens, key, num_new_tokens=12,
                                    prompt_mask=prompt_mask, sampling=sampling, stop_tokens=stop_tokens, pad_id=0)

    key = jax.random.key(0)
    stop = reference[0][4]  # row 0 ends at its first occurrence of this token (row 1 maybe too)
    out, generated = rollout(params, tokens, mask >= 0, key, SamplingConfig(), (stop,))
    assert out.shape == generated.shape == (2, 20)
    np.testing.assert_array_equal(out[:, :8], tokens)
    assert not np.asarray(generated[:, :8]).any()
    stopped = Generator(model, stop_tokens=(stop,)).generate(prompts, max_new_tokens=12)
    for row, ref in enumerate(reference):
        last = ref.index(stop) if stop in ref else 11
        assert stopped[row] == ref[:last + 1]
        assert np.asarray(generated[row, 8:]).tolist() == [i <= last for i in range(12)]
        assert np.asarray(out[row, 8:]).tolist() == ref[:last + 1] + [0] * (11 - last)

    sampled = SamplingConfig(temperature=1.0, top_k=20)
    a, _ = rollout(params, tokens, mask >= 0, key, sampled, ())
    b, _ = rollout(params, tokens, mask >= 0, key, sampled, ())
    c, _ = rollout(params, tokens, mask >= 0, jax.random.key(1), sampled, ())
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def test_generator_streams_and_compiles_once_per_bucket(tiny):
    config, model = tiny
    gen = Generator(model, sampling=SamplingConfig(temperature=0.8, top_p=0.9))
    seen = []
    outs = gen.generate([[1, 2, 3]], max_new_tokens=5, key=jax.random.key(0),
                        on_step=lambda step, tokens, finished: seen.append((step, tokens.tolist())))
    assert [s for s, _ in seen] == list(range(5)) and [t[0] for _, t in seen] == outs[0]
    compiled = generator_module._decode._cache_size(), generator_module._prefill._cache_size()
    gen.generate([[4, 5, 6, 7, 8, 9, 10]], max_new_tokens=6, key=jax.random.key(1))  # same buckets (16, 32)
    assert (generator_module._decode._cache_size(), generator_module._prefill._cache_size()) == compiled


def test_bad_input_raises(tiny):
    config, model = tiny
    gen = Generator(model)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match=r"\[0, 512\), got \[512\]"):
        gen.generate([[1, 512]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 0"):
        gen.generate([[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="num_new_tokens"):
        sample_continuations(model, jnp.ones((1, 4), jnp.int32), jax.random.key(0), num_new_tokens=0)


def test_cache_shardings():
    from llama4_jax.sharding import MESH_AXES, MeshConfig, make_mesh

    mesh = make_mesh(MeshConfig(data=4, fsdp=1, expert=1, tensor=2))
    assert mesh.axis_names == MESH_AXES
    cache = init_cache(TINY_SCOUT, 4, 32)
    placed = jax.device_put(cache, cache_shardings(cache, mesh))
    assert placed.keys[0].sharding.shard_shape(placed.keys[0].shape) == (1, 1, 7, 1, 16)
    assert placed.positions.sharding.shard_shape((4, 32)) == (1, 32)


def test_cli_generate_and_eval(tiny, tmp_path, capsys):
    from llama4_jax.checkpoint import save_model
    from llama4_jax.cli import main
    from llama4_jax.convert.save import save_hf
    from llama4_jax.data import train_bpe

    config, model = tiny
    save_model(model, tmp_path / "orbax")
    save_hf(model, tmp_path / "hf")
    args = ["--prompt-ids", "5,17,250", "--max-new-tokens", "6", "--stop-token", "-1"]
    assert main(["generate", str(tmp_path / "orbax"), *args]) == 0
    streamed = capsys.readouterr().out.split()
    assert streamed == [str(t) for t in Generator(model).generate([[5, 17, 250]], max_new_tokens=6)[0]]
    assert main(["generate", str(tmp_path / "hf"), *args]) == 0
    assert capsys.readouterr().out.split() == streamed

    text = "def add(a, b):\n    return a + b\n" * 40
    train_bpe([text], 300).save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "data.txt").write_text(text)
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "def add", "--max-new-tokens", "4"]) == 0
    assert main(["eval", str(tmp_path / "hf"), str(tmp_path / "data.txt"), "--split", "train", "--seq-len", "32",
                 "--batch-size", "2"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    loss, perplexity = float(line.split()[1]), float(line.split()[3])
    assert 0 < loss < 20 and perplexity == pytest.approx(np.exp(loss), rel=1e-3)
    assert main(["eval", str(tmp_path), str(tmp_path / "data.txt")]) == 1
    assert "holds no config.json" in capsys.readouterr().err
