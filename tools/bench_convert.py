"""Benchmark of checkpoint conversion: memory and speed on a synthetic multi-GB Llama 4 checkpoint.

Builds an index-sharded Hugging Face checkpoint with real Llama 4 tensor names (MoE layers with fused
experts, bf16 random bits), then converts HF -> Orbax -> HF, each in a fresh process, and a plain copy of
the same files in the same run. Prints, per step: seconds, MB/s and its ratio to the copy, and the peak
RSS over a baseline process (same imports, JAX initialised) divided by the largest single tensor. Finally
checks that the round trip reproduced every tensor bit for bit.

    python tools/bench_convert.py                      # ~3.9 GB under /tmp/llama4_bench
    python tools/bench_convert.py --layers 4 --expert-width 4096
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llama4_jax import Llama4Config
from llama4_jax.convert import safetensors_io as st
from llama4_jax.convert.hf import entries_by_param
from llama4_jax.convert.load import open_hf
from llama4_jax.convert.save import _plan, hf_config_json
from llama4_jax.counting import abstract_model

# Each child process prints one JSON line: its peak RSS (VmHWM, see peak_rss_bytes) and what it did.
_CHILD = """
import json, sys, time
import jax
from llama4_jax.convert import streaming, safetensors_io
from llama4_jax.convert.files import peak_rss_bytes
stats_bytes = lambda d: sum(t.nbytes for t in safetensors_io.open_directory(d)[0].values())
jax.devices()
step, src, dst = sys.argv[1:4]
out = {}
if step == "hf_to_orbax":
    out["hf_to_orbax"] = streaming.hf_to_orbax(src, dst).__dict__
elif step == "orbax_to_hf":
    out["orbax_to_hf"] = streaming.orbax_to_hf(src, dst, max_shard_size="2GB").__dict__
elif step == "load_save":  # the in-memory API: the whole model lives in (host) device memory
    from llama4_jax import load_hf, save_hf
    start = time.perf_counter()
    model = jax.block_until_ready(load_hf(src))
    out["load_hf"] = {"seconds": time.perf_counter() - start, "bytes": stats_bytes(src)}
    out["save_hf"] = save_hf(model, dst, max_shard_size="2GB").__dict__
print(json.dumps({"peak_rss": peak_rss_bytes(), "steps": out}))
"""


def bench_config(args: argparse.Namespace) -> Llama4Config:
    return Llama4Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_width,
        intermediate_size_mlp=4 * args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
        num_key_value_heads=8, head_dim=128, num_local_experts=args.experts, interleave_moe_layer_step=1,
        rope_scaling=None)


def write_synthetic(config: Llama4Config, directory: Path, seed: int = 0) -> None:
    """HF layout, one safetensors file per decoder layer (plus one for embeddings/head), written with the
    safetensors package itself so the input does not depend on our writer."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    shapes = {p: (v.shape, v.dtype) for p, v in _params(config)}
    files: dict[str, list] = {}
    for entry, _, hf_shape, _ in _plan(config, shapes, st.DTYPES["BF16"]):
        layer = entry.hf_name.split(".")[2] if entry.hf_name.startswith("model.layers.") else "other"
        files.setdefault(layer, []).append((entry.hf_name, hf_shape))
    directory.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, tensors in enumerate(files.values()):
        name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        data = {}
        for hf_name, shape in tensors:
            # Random bf16 bit patterns with the exponent's top bit cleared: finite values, incompressible.
            bits = np.frombuffer(rng.bytes(2 * math.prod(shape)), np.uint16) & np.uint16(0xBFFF)
            data[hf_name] = torch.from_numpy(bits.reshape(shape).astype(np.int16)).view(torch.bfloat16)
            weight_map[hf_name] = name
            total += 2 * math.prod(shape)
        save_file(data, directory / name, metadata={"format": "pt"})
        del data
    (directory / st.INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_config_json(config, "bfloat16")))


def _params(config: Llama4Config):
    from flax import nnx

    return list(nnx.to_flat_state(nnx.state(abstract_model(config, st.DTYPES["BF16"]), nnx.Param)))


def run_child(step: str, src: Path | str = "", dst: Path | str = "") -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, step, str(src), str(dst)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if proc.returncode:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_files(src: Path, dst: Path, sync: bool) -> float:
    start = time.perf_counter()
    dst.mkdir()
    for file in sorted(src.iterdir()):
        shutil.copy(file, dst / file.name)
        if sync:
            fd = os.open(dst / file.name, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    return time.perf_counter() - start


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of `a` equals its namesake in `b`, bit for bit (read one at a time)."""
    ta, problems_a = st.open_directory(a)
    tb, problems_b = st.open_directory(b)
    assert not problems_a and not problems_b, problems_a + problems_b
    if ta.keys() != tb.keys():
        return False
    for name, info in ta.items():
        x, y = st.read_tensor(info), st.read_tensor(tb[name])
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/llama4_bench"))
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (8 = two scanned 4-layer blocks)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)

    config = bench_config(args)
    shutil.rmtree(args.dir, ignore_errors=True)
    hf, orbax, back = args.dir / "hf", args.dir / "orbax", args.dir / "hf_again"
    start = time.perf_counter()
    write_synthetic(config, hf)
    source = open_hf(hf)
    size = sum(t.nbytes for t in source.tensors.values())
    largest = max(source.tensors.values(), key=lambda t: t.nbytes)
    groups = entries_by_param(config)
    largest_param = max(_params(config), key=lambda pv: math.prod(pv[1].shape))
    param_bytes = 2 * math.prod(largest_param[1].shape)
    print(f"synthetic checkpoint: {size / 1e9:.2f} GB, {len(source.tensors)} tensors in "
          f"{len({t.file for t in source.tensors.values()})} files, written in {time.perf_counter() - start:.0f} s")
    print(f"  {config.num_hidden_layers} MoE layers ({config.num_blocks} scanned blocks of {config.block_size}), "
          f"hidden {config.hidden_size}, {config.num_local_experts} experts of width {config.intermediate_size}, bf16")
    print(f"  largest HF tensor: {largest.name} {list(largest.shape)} = {largest.nbytes / 2**20:.0f} MiB")
    print(f"  largest of our parameters: {'.'.join(map(str, largest_param[0]))} {list(largest_param[1].shape)} = "
          f"{param_bytes / 2**20:.0f} MiB ({len(groups[largest_param[0]])} HF tensors stacked)\n")

    baseline = run_child("baseline")["peak_rss"]
    copy_plain = copy_files(hf, args.dir / "copy", sync=False)
    copy_synced = copy_files(hf, args.dir / "copy_synced", sync=True)
    shutil.rmtree(args.dir / "copy")
    shutil.rmtree(args.dir / "copy_synced")
    streamed = [run_child("hf_to_orbax", hf, orbax), run_child("orbax_to_hf", orbax, back)]
    exact = same_tensors(hf, back)
    shutil.rmtree(back)
    in_memory = run_child("load_save", hf, back)
    exact_in_memory = same_tensors(hf, back)

    unit = max(largest.nbytes, param_bytes)  # the largest tensor either format holds
    budget = 2 * unit + 300e6
    rate_plain, rate_synced = size / copy_plain / 1e6, size / copy_synced / 1e6
    print(f"baseline process (imports + JAX init): peak RSS {baseline / 2**20:.0f} MiB\n")
    print(f"{'step':<32} {'seconds':>8} {'MB/s':>6} {'/copy':>6} {'/synced':>8} {'peak-baseline':>14} "
          f"{'/HF tensor':>11} {'/largest':>9}")
    print(f"{'copy (shutil.copy)':<32} {copy_plain:>8.2f} {rate_plain:>6.0f}")
    print(f"{'copy + fsync per file':<32} {copy_synced:>8.2f} {rate_synced:>6.0f}")
    names = {"hf_to_orbax": "HF -> Orbax (streamed)", "orbax_to_hf": "Orbax -> HF (streamed)",
             "load_hf": "load_hf (model in RAM)", "save_hf": "save_hf (model in RAM)"}
    for child in (*streamed, in_memory):
        over = child["peak_rss"] - baseline
        for step, result in child["steps"].items():
            rate = result["bytes"] / result["seconds"] / 1e6
            print(f"{names[step]:<32} {result['seconds']:>8.2f} {rate:>6.0f} {rate / rate_plain:>6.2f} "
                  f"{rate / rate_synced:>8.2f} {over / 2**20:>10.0f} MiB {over / largest.nbytes:>11.2f} "
                  f"{over / unit:>9.2f}")
    print(f"\nmemory target: peak RSS over baseline <= 2 x largest tensor + 300 MB = {budget / 2**20:.0f} MiB, taking "
          f"the largest tensor either format holds ({unit / 2**20:.0f} MiB); the load_hf/save_hf rows hold the "
          "whole model by design (on CPU the device is the host)")
    for child in streamed:
        (step, result), = child["steps"].items()
        over, rate = child["peak_rss"] - baseline, result["bytes"] / result["seconds"] / 1e6
        print(f"  {names[step]}: memory {'ok' if over <= budget else 'MISSED'}; throughput "
              f"{'ok' if rate >= 0.5 * rate_plain else 'MISSED'} vs copy, "
              f"{'ok' if rate >= 0.5 * rate_synced else 'MISSED'} vs synced copy (target >= 50%)")
    print(f"HF -> Orbax -> HF reproduces every tensor bit for bit: {exact}")
    print(f"HF -> load_hf -> save_hf -> HF reproduces every tensor bit for bit: {exact_in_memory}")
    if not args.keep:
        shutil.rmtree(args.dir)
    return 0 if exact and exact_in_memory else 1


if __name__ == "__main__":
    sys.exit(main())
