"""Benchmark of checkpoint conversion: memory and speed on a synthetic multi-GB Llama 4 checkpoint.

Builds an index-sharded Hugging Face checkpoint with real Llama 4 tensor names (MoE layers with fused
experts, bf16 random bits; by default 12 layers = 3 scanned blocks), then converts HF -> Orbax -> HF, each in
a fresh process, and right before each conversion copies its source files with shutil.copy (each step starts
after `sync`, so no step pays for the previous one's dirty pages). Prints, per step: seconds, MB/s and its
ratio to the copy just before it (and to a copy that also fsyncs), and the peak RSS over a baseline process
(same imports, JAX initialised) divided by the largest single HF tensor. Checks the targets (peak <= 2 x the
largest HF tensor + 300 MB, throughput >= 50% of the copy) and that the round trip is bit for bit.

    python tools/bench_convert.py                      # ~5.9 GB under /tmp/llama4_bench
    python tools/bench_convert.py --layers 16 --expert-width 4096
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
    """Seconds to copy every file under `src` (shutil.copy, and fsync each when `sync`); the copy is deleted.
    The source is read once first, so that the copy, like the conversion after it, finds it cached."""
    files = sorted(p for p in src.rglob("*") if p.is_file())
    for file in files:
        with open(file, "rb") as f:
            while f.read(64 * 2**20):
                pass
    os.sync()
    start = time.perf_counter()
    for file in files:
        target = dst / file.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, target)
        if sync:
            fd = os.open(target, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - start
    shutil.rmtree(dst)
    return seconds


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
    parser.add_argument("--layers", type=int, default=12, help="decoder layers (12 = three scanned 4-layer blocks)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--expert-width", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=65536)
    parser.add_argument("--no-in-memory", action="store_true", help="skip the load_hf/save_hf comparison")
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args(argv)

    config = bench_config(args)
    if config.num_blocks < 2:
        parser.error(f"--layers {args.layers} gives {config.num_blocks} scanned block; use >= {2 * config.block_size}")
    shutil.rmtree(args.dir, ignore_errors=True)
    hf, orbax, back = args.dir / "hf", args.dir / "orbax", args.dir / "hf_again"
    size, largest = describe(config, hf)

    baseline = run_child("baseline")["peak_rss"]
    rows = []  # (child result, plain copy seconds, synced copy seconds) per conversion
    for step, src, dst in (("hf_to_orbax", hf, orbax), ("orbax_to_hf", orbax, back)):
        copies = copy_files(src, args.dir / "copy", sync=False), copy_files(src, args.dir / "copy", sync=True)
        os.sync()
        rows.append((run_child(step, src, dst), *copies))
    exact = same_tensors(hf, back)
    if not args.no_in_memory:
        shutil.rmtree(back)
        copies = copy_files(hf, args.dir / "copy", sync=False), copy_files(hf, args.dir / "copy", sync=True)
        os.sync()
        rows.append((run_child("load_save", hf, back), *copies))
        exact = exact and same_tensors(hf, back)
    ok = report(baseline, size, largest, rows)
    print(f"HF -> Orbax -> HF{'' if args.no_in_memory else ' and HF -> load_hf -> save_hf -> HF'} reproduce every "
          f"tensor bit for bit: {exact}")
    if not args.keep:
        shutil.rmtree(args.dir)
    return 0 if exact and ok else 1


def describe(config: Llama4Config, hf: Path) -> tuple[int, int]:
    """Writes the synthetic checkpoint and prints what it holds; returns its bytes and its largest tensor's."""
    start = time.perf_counter()
    write_synthetic(config, hf)
    source = open_hf(hf)
    size = sum(t.nbytes for t in source.tensors.values())
    largest = max(source.tensors.values(), key=lambda t: t.nbytes)
    groups = entries_by_param(config)
    largest_param = max(_params(config), key=lambda pv: math.prod(pv[1].shape))
    print(f"synthetic checkpoint: {size / 1e9:.2f} GB, {len(source.tensors)} tensors in "
          f"{len({t.file for t in source.tensors.values()})} files, written in {time.perf_counter() - start:.0f} s")
    print(f"  {config.num_hidden_layers} MoE layers ({config.num_blocks} scanned blocks of {config.block_size}), "
          f"hidden {config.hidden_size}, {config.num_local_experts} experts of width {config.intermediate_size}, bf16")
    print(f"  largest HF tensor: {largest.name} {list(largest.shape)} = {largest.nbytes / 2**20:.0f} MiB")
    print(f"  largest of our parameters: {'.'.join(map(str, largest_param[0]))} {list(largest_param[1].shape)} = "
          f"{2 * math.prod(largest_param[1].shape) / 2**20:.0f} MiB ({len(groups[largest_param[0]])} HF tensors "
          "stacked; converted one block at a time)\n")
    return size, largest.nbytes


_NAMES = {"hf_to_orbax": "HF -> Orbax (streamed)", "orbax_to_hf": "Orbax -> HF (streamed)",
          "load_hf": "load_hf (model in RAM)", "save_hf": "save_hf (model in RAM)"}


def report(baseline: int, size: int, largest: int, rows: list[tuple[dict, float, float]]) -> bool:
    """Prints the table and the targets; returns whether the streamed conversions met both."""
    budget = 2 * largest + 300e6
    print(f"baseline process (imports + JAX init): peak RSS {baseline / 2**20:.0f} MiB")
    print("copy: shutil.copy of the conversion's source files, right before it; synced: the same, fsync per file\n")
    print(f"{'step':<24} {'seconds':>8} {'MB/s':>6} {'copy MB/s':>10} {'/copy':>6} {'synced MB/s':>12} {'/synced':>8} "
          f"{'peak-baseline':>14} {'/HF tensor':>11}")
    ok = True
    for child, copy_plain, copy_synced in rows:
        over = child["peak_rss"] - baseline
        plain, synced = size / copy_plain / 1e6, size / copy_synced / 1e6
        for step, result in child["steps"].items():
            rate = result["bytes"] / result["seconds"] / 1e6
            print(f"{_NAMES[step]:<24} {result['seconds']:>8.2f} {rate:>6.0f} {plain:>10.0f} {rate / plain:>6.2f} "
                  f"{synced:>12.0f} {rate / synced:>8.2f} {over / 2**20:>10.0f} MiB {over / largest:>11.2f}")
    print(f"\ntargets, streamed conversions: peak RSS over baseline <= 2 x largest HF tensor + 300 MB = "
          f"{budget / 2**20:.0f} MiB; throughput >= 50% of the plain copy (the load_hf/save_hf rows hold the whole "
          "model by design: on CPU the device is the host)")
    for child, copy_plain, _ in rows:
        if "load_hf" in child["steps"]:
            continue
        (step, result), = child["steps"].items()
        over, rate = child["peak_rss"] - baseline, result["bytes"] / result["seconds"] / 1e6
        memory_ok, speed_ok = over <= budget, rate >= 0.5 * size / copy_plain / 1e6
        ok = ok and memory_ok and speed_ok
        print(f"  {_NAMES[step]}: memory {over / 2**20:.0f} MiB {'ok' if memory_ok else 'MISSED'}; throughput "
              f"{rate / (size / copy_plain / 1e6):.2f} x copy {'ok' if speed_ok else 'MISSED'}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
