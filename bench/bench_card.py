"""Card open/verify vs safetensors: reach every tensor of a LLaMA-7B-shape rank-16 fp16 adapter.

The adapter: LoRA on q,k,v,o of 32 layers at hidden 4096, rank 16, float16 (33.5 MB of tensors),
written once as a card and once as a PEFT-style safetensors file with the same bytes. Measured in
one run, alternating the tools (A B A B) so drift hits both alike, medians of --repeats after
--warmup runs:

  open + reach every tensor      LoRACard.open + torch views   vs  safetensors.torch.load_file, safe_open
  same, copied into preallocated torch tensors (what a load really costs): LoRACard.read_into
                                 (os.preadv per batch column straight into the tensors) vs
                                 load_file + copy_; also torch views + copy_, and a bare preadv
  verify (format 2)              values + BLAKE3 pieces + digest vs  blake3(buffer, max_threads=2) over
                                 the same bytes (target >= 0.8x); also after a fresh open
  verify (format 1)              values + sha256 digest        vs  hashlib.sha256 and the same blake3
  open + reach, format 1         the same tensors written as format 1 (readers keep reading it)

A fresh copy of the card with one flipped tensor byte is checked to fail verification (no
cache on the measured paths).

    python -m bench card [--repeats 30] [--warmup 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import mmap
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import numpy as np
import pyarrow as pa

from bench._machine import cpu_model
from loraflight.engine.card import LoRACard, ModuleLoRA
from loraflight.errors import CardError

LAYERS, HIDDEN, RANK = 32, 4096, 16
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(directory: Path) -> tuple[Path, Path]:
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(0)
    mods, tensors = [], {}
    for i in range(LAYERS):
        for p in PROJ:
            a = (rng.standard_normal((RANK, HIDDEN)) * 0.02).astype(np.float16)
            b = (rng.standard_normal((HIDDEN, RANK)) * 0.02).astype(np.float16)
            name = f"model.layers.{i}.self_attn.{p}"
            mods.append(ModuleLoRA(name, RANK, 2.0 * RANK, a, b))
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.from_numpy(a)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.from_numpy(b)
    card_path = LoRACard.build(mods, name="llama7b-r16").write(directory / "adapter.lora.arrow")
    st_path = directory / "adapter_model.safetensors"
    save_file(tensors, str(st_path), metadata={"format": "pt"})
    return card_path, st_path


def paired(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per function, run in alternation after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def env_line() -> str:
    import safetensors
    import torch

    cpu = cpu_model()
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, pyarrow {pa.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {np.__version__}; nproc {os.cpu_count()}; "
        f"CPU {cpu}; torch threads {torch.get_num_threads()}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument(
        "--dir", type=Path, default=None, help="where to write the two files (default: a temp dir)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads, the same for both sides")
    args = ap.parse_args(argv)

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        card_path, st_path = build(Path(d))
        card_bytes, st_bytes = card_path.stat().st_size, st_path.stat().st_size
        ref = LoRACard.open(card_path)
        v1_path = LoRACard.build(ref.modules, name=ref.name, created=ref.header.created, major=1).write(
            Path(d) / "adapter-v1.lora.arrow"
        )
        assert ref.format_major == 2 and LoRACard.open(v1_path).format_major == 1
        tensor_bytes = ref.tensor_nbytes
        dst = {
            m.module: (
                torch.empty(m.a.shape, dtype=torch.float16),
                torch.empty(m.b.shape, dtype=torch.float16),
            )
            for m in ref
        }
        st_dst = {}
        for m, (a, b) in dst.items():
            st_dst[f"base_model.model.{m}.lora_A.weight"] = a
            st_dst[f"base_model.model.{m}.lora_B.weight"] = b

        def card_reach() -> object:
            return LoRACard.open(card_path).torch_tensors()

        def card1_reach() -> object:
            return LoRACard.open(v1_path).torch_tensors()

        def card_numpy() -> object:
            return [(m.a, m.b) for m in LoRACard.open(card_path)]

        def raw_arrow() -> object:
            with open(card_path, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            r = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mm)))
            return [r.get_batch(i) for i in range(r.num_record_batches)]

        def raw_pa_map() -> object:
            r = pa.ipc.open_file(pa.memory_map(str(card_path)))
            return [r.get_batch(i) for i in range(r.num_record_batches)]

        def st_load() -> object:
            return load_file(str(st_path))

        def st_open() -> object:
            with safe_open(str(st_path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

        def card_copy() -> None:
            LoRACard.open(card_path).read_into(dst)  # os.preadv per batch column into the tensors

        dst_bytes = {m: (a.numpy().data.cast("B"), b.numpy().data.cast("B")) for m, (a, b) in dst.items()}

        def card_preadv() -> None:
            """Experiment: each batch column read with one os.preadv from the file straight into
            the destination tensors (no page faults through the mapping)."""
            card = LoRACard.open(card_path)
            base = card.mapping.address  # the bench reads the card layout (public accessors)
            fd = os.open(card_path, os.O_RDONLY)
            try:
                for run in card.runs:
                    for col, flat in ((0, run.flat_a), (1, run.flat_b)):
                        bufs = [dst_bytes[n][col] for n in run.names]
                        got = os.preadv(fd, bufs, flat.ctypes.data - base)
                        assert got == flat.nbytes, "short read"
            finally:
                os.close(fd)

        def card_views_copy() -> None:
            for m, (a, b) in LoRACard.open(card_path).torch_tensors().items():
                da, db = dst[m]
                da.copy_(a)
                db.copy_(b)

        def st_load_copy() -> None:
            for k, t in load_file(str(st_path)).items():
                st_dst[k].copy_(t)

        def st_open_copy() -> None:
            with safe_open(str(st_path), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118
                    st_dst[k].copy_(f.get_tensor(k))

        reach = paired(
            {
                "card": card_reach,
                "card1": card1_reach,
                "card_np": card_numpy,
                "raw": raw_arrow,
                "raw_pa": raw_pa_map,
                "load_file": st_load,
                "safe_open": st_open,
            },
            args.repeats,
            args.warmup,
        )
        copy = paired(
            {
                "card": card_copy,
                "card_views": card_views_copy,
                "card_preadv": card_preadv,
                "load_file": st_load_copy,
                "safe_open": st_open_copy,
            },
            args.repeats,
            args.warmup,
        )
        # correctness of what was timed: the copies hold the same bits
        for m in ref:
            a, b = dst[m.module]
            assert a.numpy().tobytes() == m.a.tobytes() and b.numpy().tobytes() == m.b.tobytes()

        blob = b"".join(m.a.tobytes() + m.b.tobytes() for m in ref)
        opened = LoRACard.open(card_path)
        opened1 = LoRACard.open(v1_path)
        # the scan's slow case: values of magnitude 2 and more beside small ones set every exponent
        # bit between them, so the one-pass OR test cannot rule NaN/Inf out and the exact test runs
        wide = [dataclasses.replace(m, a=m.a * np.float16(256.0)) for m in ref]
        opened_wide = LoRACard.open(
            LoRACard.build(wide, name="llama7b-r16-wide").write(Path(d) / "wide.lora.arrow")
        )
        ver = paired(
            {
                "verify": lambda: opened.verify(),
                "verify_open": lambda: LoRACard.open(card_path).verify(),
                "verify1": lambda: opened1.verify(),
                "verify_wide": lambda: opened_wide.verify(),
                "blake3x2": lambda: blake3.blake3(blob, max_threads=2).digest(),
                "sha256": lambda: hashlib.sha256(blob).digest(),
            },
            args.repeats,  # as many as the other rows: verify medians of 10 moved with the load
            2,
        )
        # what was timed verifies for real: a fresh file with one flipped tensor byte fails
        raw = bytearray(card_path.read_bytes())
        run = ref.runs[len(ref.runs) // 2]
        raw[run.flat_a.ctypes.data - ref.mapping.address + 1001] ^= 0x01
        tampered = Path(d) / "tampered.lora.arrow"
        tampered.write_bytes(bytes(raw))
        try:
            LoRACard.open(tampered).verify()
            raise AssertionError("a flipped tensor byte passed verification")
        except CardError as e:
            assert f"piece {len(ref.runs) // 2} of {len(ref.runs)}" in str(e), e

    def ms(x: float) -> str:
        return f"{x * 1e3:8.3f} ms"

    print(f"# bench card: {LAYERS} layers x {len(PROJ)} projections, hidden {HIDDEN}, rank {RANK}, fp16")
    print(
        f"# card {card_bytes / 1e6:.1f} MB, safetensors {st_bytes / 1e6:.1f} MB, tensors {tensor_bytes / 1e6:.1f} MB"
    )
    print(f"# medians of {args.repeats} alternating runs after {args.warmup} warm-up; {env_line()}")
    print()
    print(
        "| measure | loraflight card | competitor | competitor time | speed-up (competitor / card) | target |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for comp in ("load_file", "safe_open"):
        print(
            f"| open + reach every tensor (torch views) | {ms(reach['card'])} | safetensors `{comp}` | "
            f"{ms(reach[comp])} | {reach[comp] / reach['card']:.2f}x | >= 5x vs load_file |"
        )
    print(
        f"| open + reach every tensor (numpy views) | {ms(reach['card_np'])} | safetensors `load_file` | "
        f"{ms(reach['load_file'])} | {reach['load_file'] / reach['card_np']:.2f}x | |"
    )
    print(
        f"| (floor) mmap + pyarrow IPC reader, read batches only | {ms(reach['raw'])} | safetensors `load_file` | "
        f"{ms(reach['load_file'])} | {reach['load_file'] / reach['raw']:.2f}x | |"
    )
    print(
        f"| (reference) same with `pa.memory_map` | {ms(reach['raw_pa'])} | safetensors `load_file` | "
        f"{ms(reach['load_file'])} | {reach['load_file'] / reach['raw_pa']:.2f}x | |"
    )
    print(
        f"| open + reach every tensor, format-1 card | {ms(reach['card1'])} | safetensors `load_file` | "
        f"{ms(reach['load_file'])} | {reach['load_file'] / reach['card1']:.2f}x | >= 5x vs load_file |"
    )
    for comp in ("load_file", "safe_open"):
        print(
            f"| open + copy into preallocated torch tensors | {ms(copy['card'])} | safetensors `{comp}` + `copy_` | "
            f"{ms(copy[comp])} | {copy[comp] / copy['card']:.2f}x | >= 2x vs load_file |"
        )
    print(
        f"| (alternative) open + torch views + `copy_` per tensor | {ms(copy['card_views'])} | safetensors "
        f"`load_file` + `copy_` | {ms(copy['load_file'])} | {copy['load_file'] / copy['card_views']:.2f}x | |"
    )
    print(
        f"| (experiment) open + `os.preadv` per batch column into the tensors | {ms(copy['card_preadv'])} | "
        f"safetensors `load_file` + `copy_` | {ms(copy['load_file'])} | "
        f"{copy['load_file'] / copy['card_preadv']:.2f}x | |"
    )

    def gbs(k: str) -> float:
        return len(blob) / ver[k] / 1e9

    b3 = f"`blake3(buffer, max_threads=2)` over the tensor bytes | {gbs('blake3x2'):.2f} GB/s"
    print(
        f"| verify, format 2 (finite + {len(ref.runs)} BLAKE3 pieces + digest) | {gbs('verify'):.2f} GB/s "
        f"({ms(ver['verify'])}) | {b3} | {gbs('verify') / gbs('blake3x2'):.2f}x | >= 0.8x |"
    )
    print(
        f"| verify, format 2, values the OR test cannot decide (A x 256: exact scan) | "
        f"{gbs('verify_wide'):.2f} GB/s ({ms(ver['verify_wide'])}) | {b3} | "
        f"{gbs('verify_wide') / gbs('blake3x2'):.2f}x | |"
    )
    print(
        f"| verify, format 2, fresh open each time | {gbs('verify_open'):.2f} GB/s ({ms(ver['verify_open'])}) | "
        f"{b3} | {gbs('verify_open') / gbs('blake3x2'):.2f}x | |"
    )
    print(
        f"| verify, format 1 (finite + sha256 digest) | {gbs('verify1'):.2f} GB/s ({ms(ver['verify1'])}) | "
        f"{b3} | {gbs('verify1') / gbs('blake3x2'):.2f}x | (format 1) |"
    )
    print(
        f"| verify, format 1 | {gbs('verify1'):.2f} GB/s | hashlib.sha256 of the tensor bytes | "
        f"{gbs('sha256'):.2f} GB/s | {gbs('verify1') / gbs('sha256'):.2f}x | ~ sha256 |"
    )
    print(
        f"| verify, format 2 vs format 1 | {ms(ver['verify'])} | format-1 verify | {ms(ver['verify1'])} | "
        f"{ver['verify1'] / ver['verify']:.2f}x | |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
