"""Checkpoint conversion: Hugging Face <-> llama4_jax <-> Orbax, checked against transformers and safetensors.

Round trips must be bit for bit; exported models must load in transformers with no missing or unexpected
keys and give our logits at PARITY_RTOL; bad checkpoints must fail with one error that lists everything.
"""

import json
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from hf_reference import PARITY_RTOL, hf_model, hf_text_config, random_ids
from safetensors import safe_open
from safetensors.numpy import save_file

import llama4_jax.cli
from llama4_jax import TINY_MAVERICK, TINY_SCOUT, Llama4Config, Llama4ForCausalLM, checkpoint, load_hf, save_hf
from llama4_jax.checkpoint import restore_model, save_model
from llama4_jax.convert import safetensors_io as st
from llama4_jax.convert import streaming
from llama4_jax.convert.hf import entries
from llama4_jax.convert.pipeline import prefetch
from llama4_jax.convert.save import LLAMA4_SPECIAL_TOKENS, hf_config_json
from llama4_jax.convert.streaming import hf_to_orbax, orbax_to_hf
from llama4_jax.sharding import MeshConfig, make_mesh, state_shardings

SCOUT_LIKE = TINY_SCOUT.replace(num_hidden_layers=8)  # all MoE, 2 scanned blocks
MAVERICK_LIKE = TINY_MAVERICK.replace(num_hidden_layers=8)  # dense/MoE interleaved


def _hf_checkpoint(directory, config, dtype=torch.float32, seed=0, **save_kwargs):
    hf_model(config, seed=seed).to(dtype).save_pretrained(directory, **save_kwargs)
    return directory


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                assert f.metadata() == {"format": "pt"}
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _assert_same_tensors(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys(), ta.keys() ^ tb.keys()
    for name, x in ta.items():
        y = tb[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{name} differs"


def _params(model):
    return {p: v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_close(ours, ref):
    err, scale = np.abs(np.asarray(ours) - ref).max(), np.abs(ref).max()
    assert err <= PARITY_RTOL * scale, f"max |diff| {err:.3g} > {PARITY_RTOL:g} x max |ref| {scale:.3g}"


# --------------------------------------------------------------------------------------------------
# Round trips and transformers


@pytest.mark.parametrize("config,dtype,tied", [
    (SCOUT_LIKE, torch.float32, False), (SCOUT_LIKE, torch.bfloat16, True),
    (MAVERICK_LIKE, torch.float32, True), (MAVERICK_LIKE, torch.bfloat16, False),
], ids=["scout-fp32", "scout-bf16-tied", "maverick-fp32-tied", "maverick-bf16"])
def test_hf_ours_hf_round_trip_is_bit_exact(tmp_path, config, dtype, tied):
    src = _hf_checkpoint(tmp_path / "hf", config.replace(tie_word_embeddings=tied), dtype, max_shard_size="200KB")
    model = load_hf(src)
    assert model.model.embed_tokens.get_value().dtype == (jnp.bfloat16 if dtype == torch.bfloat16 else jnp.float32)
    save_hf(model, tmp_path / "out", max_shard_size="300KB")
    _assert_same_tensors(src, tmp_path / "out")
    index = json.loads((tmp_path / "out" / st.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in st.open_directory(tmp_path / "out")[0].values())


def test_export_loads_in_transformers_with_our_logits(tmp_path):
    config = SCOUT_LIKE.replace(initializer_range=0.3)  # logits of a few units, so the tolerance means something
    model = Llama4ForCausalLM(config, rngs=nnx.Rngs(0))
    save_hf(model, tmp_path / "out", max_shard_size="1MB")
    hf, info = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.architectures == ["Llama4ForCausalLM"]
    ids = random_ids(config, 2, 40)
    hf.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = hf.float().eval()(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    assert 1.0 < np.abs(ref).max() < 100.0
    _assert_close(model(jnp.asarray(ids)), ref)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "llama4_text"
    assert {"rope_parameters", "rope_theta", "rope_scaling"} <= written.keys()  # new and legacy RoPE keys
    assert Llama4Config.from_hf(written) == config
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None}


def test_llama4_vocabulary_gets_llama4_special_tokens():
    written = hf_config_json(TINY_SCOUT.replace(vocab_size=202048), "bfloat16")
    assert {k: written[k] for k in LLAMA4_SPECIAL_TOKENS} == LLAMA4_SPECIAL_TOKENS
    assert written["dtype"] == written["torch_dtype"] == "bfloat16"
    transformers.Llama4TextConfig(**{k: v for k, v in written.items() if k != "architectures"})  # strict: valid
    assert hf_config_json(TINY_SCOUT, "float32")["bos_token_id"] == TINY_SCOUT.bos_token_id


def test_multimodal_layout_gives_the_same_text_logits(tmp_path):
    config = MAVERICK_LIKE
    text = _hf_checkpoint(tmp_path / "text", config)
    tensors = {f"language_model.{k}": v.numpy() for k, v in _tensors(text).items()}
    rng = np.random.default_rng(0)
    tensors["vision_model.patch_embedding.linear.weight"] = rng.normal(size=(32, 588)).astype(np.float32)
    tensors["multi_modal_projector.linear_1.weight"] = rng.normal(size=(64, 32)).astype(np.float32)
    (tmp_path / "mm").mkdir()
    save_file(tensors, tmp_path / "mm" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "mm" / "config.json").write_text(json.dumps({
        "model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
        "text_config": hf_text_config(config).to_dict(), "vision_config": {"hidden_size": 32}}))
    ids = jnp.asarray(random_ids(config, 2, 24))
    np.testing.assert_array_equal(np.asarray(load_hf(tmp_path / "mm")(ids)), np.asarray(load_hf(text)(ids)))


def test_sharded_import_places_each_parameter_in_its_sharding(tmp_path, monkeypatch):
    src = _hf_checkpoint(tmp_path / "hf", SCOUT_LIKE)
    mesh = make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
    reads = []
    original = st.read_tensor
    monkeypatch.setattr(st, "read_tensor", lambda info, rows=slice(None), out=None: (
        reads.append((info.name, rows.indices(info.shape[0]) if info.shape else None)), original(info, rows, out))[1])
    model = load_hf(src, mesh=mesh)
    # Each device reads only its expert slice of the fused expert tensors, never a whole one.
    expert_reads = [rows for name, rows in reads if name.endswith("experts.gate_up_proj")]
    assert expert_reads and all(stop - start == SCOUT_LIKE.num_local_experts // 2 for start, stop, _ in expert_reads)
    expected = state_shardings(nnx.state(model, nnx.Param), mesh)
    reference = _params(load_hf(src))
    for (path, variable), (_, sharding) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                               nnx.to_flat_state(expected)):
        assert variable.get_value().sharding == sharding.get_value(), path
        np.testing.assert_array_equal(np.asarray(variable.get_value()), np.asarray(reference[path]))


# --------------------------------------------------------------------------------------------------
# Bad input: one error listing everything; no pickle; no half-written output


def test_every_problem_is_reported_in_one_error(tmp_path):
    src = _hf_checkpoint(tmp_path / "hf", MAVERICK_LIKE)
    tensors = {k: v.numpy() for k, v in _tensors(src).items()}
    del tensors["model.layers.2.self_attn.q_proj.weight"]  # missing
    tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)  # unexpected
    tensors["model.norm.weight"] = np.ones(65, np.float32)  # wrong shape
    tensors["model.layers.1.feed_forward.router.weight"] = np.zeros((4, 64), np.int32)  # wrong dtype
    os.remove(src / "model.safetensors")
    save_file(tensors, src / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_hf(src)
    message = str(error.value)
    assert "4 problems" in message
    assert "missing tensor model.layers.2.self_attn.q_proj.weight" in message
    assert "unexpected tensor model.layers.0.extra.weight" in message
    assert "model.norm.weight: expected shape [64] (from config.json), found [65]" in message
    assert "model.layers.1.feed_forward.router.weight: expected a float dtype" in message and "found I32" in message


def test_truncated_and_foreign_files_are_named_alongside_config_problems(tmp_path):
    src = _hf_checkpoint(tmp_path / "hf", SCOUT_LIKE, max_shard_size="200KB")
    shards = sorted(src.glob("*.safetensors"))
    with open(shards[1], "r+b") as f:
        f.truncate(os.path.getsize(shards[1]) - 100)
    shards[2].write_text("this is not a safetensors file at all")
    hf_config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf_config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError) as error:
        load_hf(src)
    message = str(error.value)
    assert f"{shards[1]}: truncated" in message
    assert f"{shards[2]}: header length" in message and "not a safetensors file" in message
    assert "quantization_config" in message


def test_pickle_checkpoints_are_refused_unopened(tmp_path, monkeypatch):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(SCOUT_LIKE.to_hf()))
    torch.save({"model.norm.weight": torch.ones(64)}, tmp_path / "hf" / "pytorch_model.bin")
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    for path in (tmp_path / "hf", tmp_path / "hf" / "pytorch_model.bin"):
        with pytest.raises(ValueError, match="pickle"):
            load_hf(path)


def test_failed_export_leaves_no_directory(tmp_path, monkeypatch):
    model = Llama4ForCausalLM(SCOUT_LIKE, rngs=nnx.Rngs(0))
    calls = []
    original = st.SafetensorsWriter.write

    def failing_write(self, name, array, row=0):
        calls.append(name)
        if len(calls) == 20:
            raise OSError("disk full")
        original(self, name, array, row)

    monkeypatch.setattr(st.SafetensorsWriter, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_hf(model, tmp_path / "out", max_shard_size="200KB")
    assert os.listdir(tmp_path) == []  # neither the destination nor the temporary directory
    monkeypatch.setattr(st.SafetensorsWriter, "write", original)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("x")
    with pytest.raises(FileExistsError):
        save_hf(model, tmp_path / "out")
    save_hf(model, tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "old").exists() and (tmp_path / "out" / "config.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]


# --------------------------------------------------------------------------------------------------
# Orbax and the command line


def test_orbax_save_restore_round_trip_sharded(tmp_path):
    mesh = make_mesh(MeshConfig(fsdp=2, expert=2, tensor=2))
    model = load_hf(_hf_checkpoint(tmp_path / "hf", MAVERICK_LIKE, torch.bfloat16), mesh=mesh)
    save_model(model, tmp_path / "ckpt")
    restored = restore_model(tmp_path / "ckpt", mesh=mesh)
    assert restored.config == model.config
    ours, back = _params(model), _params(restored)
    for path, value in ours.items():
        assert back[path].sharding == value.sharding and back[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(back[path]), np.asarray(value))
    with pytest.raises(FileExistsError):
        save_model(model, tmp_path / "ckpt")


def test_streamed_orbax_checkpoint_restores_to_the_same_model(tmp_path):
    src = _hf_checkpoint(tmp_path / "hf", SCOUT_LIKE)
    stats = hf_to_orbax(src, tmp_path / "ckpt")
    assert stats.tensors == len(_tensors(src))
    ids = jnp.asarray(random_ids(SCOUT_LIKE, 2, 24))
    np.testing.assert_array_equal(np.asarray(restore_model(tmp_path / "ckpt")(ids)), np.asarray(load_hf(src)(ids)))


def _spy_block_io(monkeypatch) -> list[tuple]:
    """Records (read or write, stored array, its shape, block index, shape moved, first row) for every
    tensorstore read or write of a block or piece of one, and fails any whole-checkpoint Orbax load."""
    moved = []
    read, write = checkpoint._read_block, checkpoint._write_part

    def spy_read(array, index, out):
        result = read(array, index, out)
        moved.append(("read", id(array), tuple(array.shape), index, result.shape, 0))
        return result

    def spy_write(array, index, value, start):
        moved.append(("write", id(array), tuple(array.shape), index, value.shape, start))
        write(array, index, value, start)

    monkeypatch.setattr(checkpoint, "_read_block", spy_read)
    monkeypatch.setattr(checkpoint, "_write_part", spy_write)
    monkeypatch.setattr(checkpoint.ocp, "load", lambda *a, **k: pytest.fail("whole-checkpoint ocp.load"))
    return moved


@pytest.mark.parametrize("config", [SCOUT_LIKE.replace(num_hidden_layers=12), MAVERICK_LIKE],
                         ids=["scout-3-blocks", "maverick-2-blocks"])
def test_streamed_conversion_moves_one_block_at_a_time_and_is_bit_exact(tmp_path, monkeypatch, config):
    src = _hf_checkpoint(tmp_path / "hf", config, torch.bfloat16, max_shard_size="300KB")
    # Chunks and pieces far smaller than a block, so that blocks are moved in several of each.
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(streaming, "PIECE_BYTES", 16384)
    moved = _spy_block_io(monkeypatch)
    hf_to_orbax(src, tmp_path / "ckpt")
    orbax_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="300KB")
    _assert_same_tensors(src, tmp_path / "back")  # HF -> Orbax -> HF, bit for bit
    # Stacked parameters move by blocks (reads) or pieces of one block (writes), never as a whole stack.
    stacked = [m for m in moved if m[2][0] == config.num_blocks]
    assert all(index is not None and part[1:] == shape[2:] for _, _, shape, index, part, _ in stacked), stacked[:3]
    reads = [m for m in stacked if m[0] == "read" and m[4] == m[2][1:]]
    writes: dict = {}
    for kind, array, shape, index, part, start in stacked:
        if kind == "write":
            writes.setdefault((array, shape, index), []).append((start, part[0]))
    num_stacked = len([e for e in entries(config) if e.block == 0])
    assert len(reads) == len(writes) == config.num_blocks * num_stacked
    assert all(sorted(pieces)[0][0] == 0 and sum(n for _, n in pieces) == shape[1] for (_, shape, _), pieces
               in writes.items())
    assert max(len(pieces) for pieces in writes.values()) > 1  # the expert blocks went in pieces
    monkeypatch.undo()  # HF -> Orbax, bit for bit: the restored model holds what load_hf gives
    restored = _params(restore_model(tmp_path / "ckpt"))
    for path, value in _params(load_hf(src)).items():
        assert restored[path].dtype == jnp.bfloat16, path
        np.testing.assert_array_equal(np.asarray(restored[path]).view(np.uint16), np.asarray(value).view(np.uint16))


@pytest.mark.parametrize("layout", ["save_model", "orbax_defaults"])
def test_whole_array_checkpoints_export_per_block(tmp_path, monkeypatch, layout):
    model = Llama4ForCausalLM(SCOUT_LIKE.replace(num_hidden_layers=12), rngs=nnx.Rngs(0))
    if layout == "save_model":  # whole arrays through Orbax, chunked per block
        save_model(model, tmp_path / "ckpt")
    else:  # Orbax's defaults: OCDBT, one chunk per array (spanning all blocks)
        params = {checkpoint.PARAMS_KEY: nnx.to_pure_dict(nnx.state(model, nnx.Param))}
        checkpoint.ocp.save(tmp_path / "ckpt", params, custom_metadata={checkpoint.CONFIG_KEY: model.config.to_hf()})
    save_hf(model, tmp_path / "direct", max_shard_size="300KB")
    moved = _spy_block_io(monkeypatch)
    orbax_to_hf(tmp_path / "ckpt", tmp_path / "back", max_shard_size="300KB")
    _assert_same_tensors(tmp_path / "direct", tmp_path / "back")
    assert all(part == shape[1:] for _, _, shape, index, part, _ in moved if index is not None)
    assert len([m for m in moved if m[3] is not None]) == 3 * len([e for e in entries(model.config) if e.block == 0])


def test_chunks_are_contiguous_and_bounded(monkeypatch):
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 32 * 2**20)
    assert checkpoint.chunk_shape((4, 16, 2048, 2, 2048), 2, stacked=True) == (1, 2, 2048, 2, 2048)
    assert checkpoint.chunk_shape((4, 16, 5120, 2, 8192), 2, stacked=True) == (1, 1, 1024, 2, 8192)
    assert checkpoint.chunk_shape((2048, 65536), 2, stacked=False) == (256, 65536)
    assert checkpoint.chunk_shape((4, 64), 4, stacked=True) == (1, 64)


def test_unfinished_parts_leave_no_checkpoint(tmp_path):
    shape = (3, 8, 4)
    with pytest.raises(ValueError, match=r"parts never \(fully\) written: w\[2\]"):
        with checkpoint.ParamWriter(tmp_path / "ckpt", SCOUT_LIKE) as writer:
            first = np.zeros(checkpoint.chunk_shape(shape, 4, stacked=True), np.float32)
            writer.add({("w",): checkpoint.FirstChunk(first, shape, stacked=True)})
            for block in (0, 1):
                writer.write_part(("w",), block, np.full(shape[1:], block, np.float32))
            with pytest.raises(ValueError, match="written already"):
                writer.write_part(("w",), 1, np.ones(shape[1:], np.float32))
            writer.write_part(("w",), 2, np.ones((4, 4), np.float32))  # half of block 2
            writer.finish()
    assert os.listdir(tmp_path) == []


def test_prefetch_keeps_order_reuses_two_slots_and_raises_at_the_failed_item():
    slots = set()

    def load(item, slot):
        slots.add(id(slot))
        if item == 5:
            raise RuntimeError("item 5")
        out = slot.array((4,), np.int64)
        out[:] = item
        return out

    got = []
    with pytest.raises(RuntimeError, match="item 5"):
        for item, value in prefetch(range(10), load, slot_bytes=32):
            got.append((item, value.tolist()))
    assert got == [(i, [i] * 4) for i in range(5)] and len(slots) == 2


def test_cli_convert_both_directions(tmp_path, capsys, monkeypatch):
    src = _hf_checkpoint(tmp_path / "hf", MAVERICK_LIKE.replace(tie_word_embeddings=True), torch.bfloat16)
    (src / "tokenizer.json").write_text("{}")
    monkeypatch.chdir(tmp_path)  # relative paths, as typed on a command line
    assert llama4_jax.cli.main(["convert", "hf", "ckpt", "--no-progress"]) == 0
    assert llama4_jax.cli.main(["convert", "ckpt", "back", "--no-progress", "--max-shard-size", "200KB",
                                "--tokenizer", "hf"]) == 0
    out = capsys.readouterr().out
    assert out.count("tensors,") == 2 and "GB in" in out and "peak RSS" in out
    _assert_same_tensors(src, tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == "{}"
    assert llama4_jax.cli.main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "x"), "--no-progress"]) == 1
    assert "neither an Orbax checkpoint nor a Hugging Face directory" in capsys.readouterr().err


def test_parse_size():
    assert st.parse_size("5GB") == 5 * 10**9 and st.parse_size("2GiB") == 2 * 2**30
    assert st.parse_size("100 kb") == 100_000 and st.parse_size(123) == 123
    with pytest.raises(ValueError):
        st.parse_size("lots")
    assert jax.device_count() == 8  # conftest: the sharding tests above ran on 8 devices


def test_param_writer_stores_all_zero_blocks(tmp_path):
    """tensorstore skips chunks equal to the fill value unless told otherwise, and Orbax's reader then refuses
    the missing chunk: a zero block (e.g. zero-initialised biases) must be stored and read back."""
    from llama4_jax import TINY_SCOUT
    from llama4_jax.checkpoint import FirstChunk, ParamReader, ParamWriter, chunk_shape

    shape = (3, 8, 16)
    first = chunk_shape(shape, 4, stacked=True)
    with ParamWriter(tmp_path / "ck", TINY_SCOUT) as writer:
        writer.add({("a",): FirstChunk(np.ones(first, np.float32), shape, True),
                    ("b",): FirstChunk(np.zeros(first, np.float32), shape, True)})
        for i in range(3):
            writer.write_part(("a",), i, np.full(shape[1:], float(i != 1), np.float32))
            writer.write_part(("b",), i, np.zeros(shape[1:], np.float32))
        writer.finish()
    reader = ParamReader(tmp_path / "ck")
    assert [float(reader.read_block(("a",), i).sum()) for i in range(3)] == [128.0, 0.0, 128.0]
    assert [float(reader.read_block(("b",), i).sum()) for i in range(3)] == [0.0, 0.0, 0.0]
