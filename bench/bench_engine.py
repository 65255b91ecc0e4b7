"""Engine vs PEFT: hot-load, hot-swap, unload, and forward overhead (unmerged, merged, mixed).

Run:  .venv/bin/python bench/bench_engine.py            (CPU table; GPU table when CUDA is there)
      .venv/bin/python bench/bench_engine.py --quick    (small model, for a smoke run)

Fairness: both sides wrap twins of one model that share the very same weight
tensors (PEFT injects its layers into one twin, the engine into the other, a
third twin stays bare for the base figure); same dtype, same thread count, both
frozen the same way (requires_grad False everywhere). Adapters are the same
bytes: PEFT folders saved by PEFT, turned into cards with `from_peft`. Every
figure is a median over repeats after a warm-up, taken in alternation (A B A B).
Hot-load is "file on disk → active adapter": ours opens + verifies (sha256 digest
and finite values) + copies; PEFT's `load_adapter` reads safetensors (no hash).
We report ours both with a full verify on every load and with the engine's
verified-file memo (a card file already verified and unchanged since).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench._machine import cpu_model  # noqa: E402
from loraflight.engine import Engine, LoRACard  # noqa: E402
from loraflight.engine._verify import forget_verified  # noqa: E402
from loraflight.engine.peft_io import from_peft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ---------------------------------------------------------------------- helpers
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def paired(fns: dict[str, Callable[[], Any]], repeats: int, device: str, warmup: int = 1) -> dict[str, float]:
    """Median seconds per fn, run in alternation (A B C A B C ...) after `warmup` rounds.

    Also returns "min:<name>" (the fastest run), printed as a noise indicator.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            t = timed(fn, device)
            if i >= warmup:
                times[k].append(t)
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update({f"min:{k}": min(v) for k, v in times.items()})
    return out


def twin(model: nn.Module) -> nn.Module:
    """A copy of `model` sharing every parameter and buffer tensor with it."""
    memo: dict[int, Any] = {id(p): p for p in model.parameters()}
    memo.update({id(b): b for b in model.buffers()})
    return copy.deepcopy(model, memo)


def freeze(m: nn.Module) -> nn.Module:
    for p in m.parameters():
        p.requires_grad_(False)
    return m.eval()


def build_llama(
    hidden: int, inter: int, layers: int, heads: int, vocab: int, dtype: torch.dtype, device: str
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
    )
    with torch.device(device):
        m = LlamaForCausalLM(cfg).to(dtype)
    return freeze(m)


def make_adapters(
    model: nn.Module, n: int, rank: int, out: Path, dtype: torch.dtype
) -> list[tuple[Path, Path]]:
    """n PEFT folders (saved by PEFT) and the same adapters as card files."""
    from peft import LoraConfig, get_peft_model

    scratch = twin(model)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    pm = get_peft_model(scratch, cfg, adapter_name="seed")
    pairs = []
    for i in range(n):
        name = f"ad{i}"
        torch.manual_seed(100 + i)
        pm.add_adapter(name, cfg)
        for mod in pm.modules():
            if hasattr(mod, "lora_A") and name in mod.lora_A:
                mod.lora_A[name].weight.data = mod.lora_A[name].weight.data.to(dtype)
                mod.lora_B[name].weight.data = mod.lora_B[name].weight.data.to(dtype)
        pm.save_pretrained(out / "peft", selected_adapters=[name])
        folder = out / "peft" / name
        card = from_peft(folder, name=name)
        pairs.append((folder, card.write(out / f"{name}.lora.arrow")))
        pm.delete_adapter(name)
    del pm, scratch
    gc.collect()
    return pairs


def env_line() -> str:
    import peft
    import transformers

    cpu = cpu_model()
    return (
        f"python {platform.python_version()}, torch {torch.__version__}, peft {peft.__version__}, "
        f"transformers {transformers.__version__}; nproc {os.cpu_count()}, torch threads "
        f"{torch.get_num_threads()}, CPU {cpu}; load average at start {os.getloadavg()[0]:.1f}"
    )


def row(label: str, ours: float, theirs: float, unit: str = "ms", note: str = "") -> str:
    ratio = theirs / ours if ours > 0 else float("inf")
    return f"| {label} | {ours * 1e3:.3f} {unit} | {theirs * 1e3:.3f} {unit} | {ratio:.2f}× | {note} |"


def less_overhead(r: dict[str, float]) -> str:
    ours, theirs = r["ours"] - r["bare"], r["peft"] - r["bare"]
    if ours <= 0:
        return "ours ≤ bare (noise)"
    return f"{theirs / ours:.1f}× less overhead"


def pct(x: float, base: float) -> str:
    return f"{(x / base - 1) * 100:+.1f} %"


# ---------------------------------------------------------------------- sections
def bench_load(model: nn.Module, adapters, device: str, repeats: int) -> list[str]:
    from peft import PeftModel
    from peft.utils.hotswap import hotswap_adapter

    ours_model, peft_base = twin(model), twin(model)
    # both sides keep one resident adapter, so neither pays for first-time layer injection
    (seed_dir, seed_card) = adapters[0]
    eng = Engine(ours_model)
    eng.load(seed_card, name="resident", activate=False)
    pm: PeftModel = PeftModel.from_pretrained(peft_base, seed_dir, adapter_name="resident")
    (dir1, card1), (dir2, card2) = adapters[1], adapters[2]
    lines = []
    c1 = LoRACard.open(card1)  # the same adapter written as format 1 (sha256), for comparison
    card1_v1 = LoRACard.build(
        c1.modules,
        name=c1.name,
        dtype=c1.dtype,
        scaling=c1.header.scaling,
        base_fingerprint=c1.header.base_fingerprint,
        peft=c1.header.peft,
        major=1,
    ).write(Path(card1).with_name("format1-" + Path(card1).name))
    del c1

    def ours_load_verify() -> None:
        forget_verified()
        eng.load(card1, name="x")

    def ours_load_verify_v1() -> None:
        forget_verified()
        eng.load(card1_v1, name="x")

    def ours_load_memo() -> None:
        eng.load(card1, name="x")

    def ours_unload() -> None:
        eng.unload("x")

    def peft_load() -> None:
        pm.load_adapter(dir1, adapter_name="x")
        pm.base_model.set_adapter("x")

    def peft_unload() -> None:
        pm.base_model.set_adapter("resident")
        pm.delete_adapter("x")

    # load and unload alternate; each is timed on its own
    t: dict[str, list[float]] = {k: [] for k in ("ov", "ov1", "om", "pl", "ou", "pu")}
    for i in range(repeats + 1):
        for key, load in (("ov", ours_load_verify), ("ov1", ours_load_verify_v1), ("om", ours_load_memo)):
            a = timed(load, device)
            b = timed(ours_unload, device)
            if i:
                t[key].append(a)
                if key == "om":
                    t["ou"].append(b)
        a = timed(peft_load, device)
        b = timed(peft_unload, device)
        if i:
            t["pl"].append(a)
            t["pu"].append(b)
    med = {k: statistics.median(v) for k, v in t.items()}
    lines.append(
        row(
            "hot-load: card file → active (full verify each time) vs load_adapter+set_adapter",
            med["ov"],
            med["pl"],
        )
    )
    lines.append(
        row(
            "hot-load: format-1 card file → active (full verify, sha256) vs load_adapter+set_adapter",
            med["ov1"],
            med["pl"],
        )
    )
    lines.append(
        row(
            "hot-load: card file → active (verified-file memo) vs load_adapter+set_adapter",
            med["om"],
            med["pl"],
        )
    )
    lines.append(row("unload vs delete_adapter", med["ou"], med["pu"]))

    # hot-swap: replace the weights of a loaded name, alternating two adapters
    eng.load(card2, name="x")
    eng.load(card1, name="x")
    digest1 = eng.adapters["x"]["digest"]
    pm.load_adapter(dir1, adapter_name="x")
    pm.base_model.set_adapter("x")
    peft_state = {"i": 0}

    def other_card() -> Path:
        # always swap to the card that is NOT loaded now (the same digest would be a no-op)
        return card2 if eng.adapters["x"]["digest"] == digest1 else card1

    def ours_swap_verify() -> None:
        forget_verified()
        eng.load(other_card(), name="x")

    def ours_swap_memo() -> None:
        eng.load(other_card(), name="x")  # both files verified before: a memo hit

    def peft_swap() -> None:
        peft_state["i"] += 1
        hotswap_adapter(pm, str(dir2 if peft_state["i"] % 2 else dir1), adapter_name="x", torch_device=device)

    med_v = paired({"ours": ours_swap_verify, "p": peft_swap}, repeats, device)
    # memo rounds after the full-verify ones (a full-verify round clears the memo)
    eng.load(other_card(), name="x")
    eng.load(other_card(), name="x")
    med_m = paired({"ours": ours_swap_memo, "p": peft_swap}, repeats, device)
    lines.append(row("hot-swap in place (full verify) vs hotswap_adapter", med_v["ours"], med_v["p"]))
    lines.append(row("hot-swap in place (verified-file memo) vs hotswap_adapter", med_m["ours"], med_m["p"]))
    eng.close()
    gc.collect()
    return lines


def bench_forward(
    model: nn.Module, adapters, device: str, batch: int, seq: int, repeats: int, vocab: int
) -> list[str]:
    from peft import PeftModel

    bare, ours_model, peft_base = twin(model), twin(model), twin(model)
    eng = Engine(ours_model)
    names = []
    pm: PeftModel | None = None
    for i, (folder, card) in enumerate(adapters[:4]):
        n = f"m{i}"
        names.append(n)
        eng.load(card, name=n, activate=False)
        if pm is None:
            pm = PeftModel.from_pretrained(peft_base, folder, adapter_name=n)
        else:
            pm.load_adapter(folder, adapter_name=n)
    assert pm is not None
    pm.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    rows = [names[i % 4] for i in range(batch)]
    lines = []

    def fwd(m: nn.Module, **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            with torch.inference_mode():
                return m(input_ids=x, **kw)

        return run

    def peft_base_run() -> Any:
        with torch.inference_mode(), pm.disable_adapter():
            return pm(input_ids=x)

    # base: nothing active on either side
    eng.deactivate()
    base = paired({"bare": fwd(bare), "ours": fwd(ours_model), "peft": peft_base_run}, repeats, device)
    # one unmerged adapter
    eng.activate("m0", exclusive=True)
    pm.base_model.set_adapter("m0")
    one = paired({"bare": fwd(bare), "ours": fwd(ours_model), "peft": fwd(pm)}, repeats, device)
    # merged
    eng.merge("m0")
    pm.merge_adapter()
    merged = paired({"bare": fwd(bare), "ours": fwd(ours_model), "peft": fwd(pm)}, repeats, device)
    eng.unmerge()
    pm.unmerge_adapter()
    # 4 adapters mixed per row

    def ours_mixed() -> Any:
        with torch.inference_mode(), eng.mixed(rows):
            return ours_model(input_ids=x)

    mixed = paired(
        {"bare": fwd(bare), "ours": ours_mixed, "peft": fwd(pm, adapter_names=rows)}, repeats, device
    )
    for label, r in (
        ("base (no adapter active)", base),
        ("one adapter, unmerged", one),
        ("merged", merged),
        ("4 adapters mixed per row", mixed),
    ):
        lines.append(
            f"| forward {batch}×{seq}: {label} | {r['ours'] * 1e3:.1f} ms ({pct(r['ours'], r['bare'])}) | "
            f"{r['peft'] * 1e3:.1f} ms ({pct(r['peft'], r['bare'])}) | {r['peft'] / r['ours']:.2f}× | "
            f"bare {r['bare'] * 1e3:.1f} ms; fastest runs: ours {pct(r['min:ours'], r['min:bare'])}, "
            f"PEFT {pct(r['min:peft'], r['min:bare'])} |"
        )
    eng.close()
    gc.collect()
    return lines


def bench_module(
    hidden: int, rank: int, batch: int, seq: int, dtype: torch.dtype, device: str, repeats: int
) -> list[str]:
    """The LoRA path alone: one hidden×hidden Linear, base vs ours vs PEFT (one adapter; 4 mixed)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(hidden, hidden, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.q_proj(x)

    base = freeze(One().to(device, dtype))
    ours_m, peft_m = twin(base), twin(base)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj"], init_lora_weights=False)
    pm = get_peft_model(peft_m, cfg, adapter_name="m0")
    for i in range(1, 4):
        pm.add_adapter(f"m{i}", cfg)
    freeze(pm)
    for mod in pm.modules():
        if hasattr(mod, "lora_A"):
            for k in mod.lora_A:
                mod.lora_A[k].weight.data = mod.lora_A[k].weight.data.to(device, dtype)
                mod.lora_B[k].weight.data = mod.lora_B[k].weight.data.to(device, dtype)
    pm.base_model.set_adapter("m0")
    from loraflight.engine.card.torch import card_from_tensors

    eng = Engine(ours_m)
    lora = pm.base_model.model.q_proj
    for i in range(4):
        k = f"m{i}"
        card = card_from_tensors(
            {"q_proj": (lora.lora_A[k].weight.data.float().cpu(), lora.lora_B[k].weight.data.float().cpu())},
            name=k,
            alpha=2.0 * rank,
        )
        eng.load(card, name=k, activate=i == 0)
    x = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    rows = [f"m{i % 4}" for i in range(batch)]

    def run(m: nn.Module, **kw: Any) -> Callable[[], Any]:
        def f() -> Any:
            with torch.inference_mode():
                for _ in range(3):
                    m(x, **kw)

        return f

    def ours_mixed() -> Any:
        with torch.inference_mode(), eng.mixed(rows):
            for _ in range(3):
                ours_m(x)

    one = paired({"bare": run(base), "ours": run(ours_m), "peft": run(pm)}, repeats, device, warmup=2)
    eng.deactivate()
    mix = paired(
        {"bare": run(base), "ours": ours_mixed, "peft": run(pm, adapter_names=rows)},
        repeats,
        device,
        warmup=2,
    )
    out = []
    for label, r in (("one adapter", one), ("4 adapters mixed per row", mix)):
        out.append(
            f"| module {hidden}×{hidden} r{rank}, x {batch}×{seq}: {label} (×3 calls) | {r['ours'] * 1e3:.2f} ms "
            f"({pct(r['ours'], r['bare'])}) | {r['peft'] * 1e3:.2f} ms ({pct(r['peft'], r['bare'])}) | "
            f"{less_overhead(r)} | "
            f"bare {r['bare'] * 1e3:.2f} ms; fastest runs: ours {pct(r['min:ours'], r['min:bare'])}, "
            f"PEFT {pct(r['min:peft'], r['min:bare'])} |"
        )
    eng.close()
    return out


def bench_7b_load(device: str, repeats: int, tmp: Path, hidden: int = 4096, layers: int = 32) -> list[str]:
    """Hot-load a LLaMA-7B-shape rank-16 fp16 card (32 layers × q,k,v,o of 4096²) into the projections."""
    from loraflight.engine.card.torch import card_from_tensors

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for t in TARGETS:
                setattr(self, t, nn.Linear(hidden, hidden, bias=False))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class Skeleton(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(layers))

    with torch.device(device):
        model = freeze(Skeleton().to(torch.float16))
    g = torch.Generator().manual_seed(0)
    tens = {
        f"layers.{i}.self_attn.{t}": (
            torch.randn(16, hidden, generator=g) * 0.01,
            torch.randn(hidden, 16, generator=g) * 0.01,
        )
        for i in range(layers)
        for t in TARGETS
    }
    path = card_from_tensors(tens, name="seven", alpha=32.0, dtype=torch.float16).write(
        tmp / "seven.lora.arrow"
    )
    mib = path.stat().st_size / 2**20
    shape = f"{layers}×4×{hidden}²"
    eng = Engine(model)
    eng.load(path, name="resident", activate=False)

    def verify_each() -> None:
        forget_verified()
        eng.load(path, name="x")

    def memo() -> None:
        eng.load(path, name="x")

    t: dict[str, list[float]] = {"v": [], "m": [], "u": []}
    for i in range(repeats + 1):
        a = timed(verify_each, device)
        eng.unload("x")
        b = timed(memo, device)
        c = timed(lambda: eng.unload("x"), device)
        if i:
            t["v"].append(a)
            t["m"].append(b)
            t["u"].append(c)
    med = {k: statistics.median(v) for k, v in t.items()}
    eng.close()
    return [
        f"| {shape} r16 fp16 card ({mib:.1f} MiB) hot-load, full verify | {med['v'] * 1e3:.2f} ms | | | PEFT not run |",
        f"| {shape} r16 fp16 card hot-load, verified-file memo | {med['m'] * 1e3:.2f} ms | | | |",
        f"| {shape} unload | {med['u'] * 1e3:.2f} ms | | | |",
    ]


HEADER = "| measure | ours | PEFT | PEFT/ours | note |\n| --- | --- | --- | --- | --- |"


def section(
    title: str, device: str, dtype: torch.dtype, dims: dict[str, int], batch: int, seq: int, args
) -> None:
    print(f"\n## {title}\n")
    print(
        f"model: LlamaForCausalLM from config {dims}, {dtype}, {device}; adapters r16 on {','.join(TARGETS)}"
    )
    model = build_llama(dtype=dtype, device=device, **dims)
    with tempfile.TemporaryDirectory() as td:
        adapters = make_adapters(model, 4, 16, Path(td), dtype)
        size = adapters[0][1].stat().st_size
        print(
            f"card file: {size / 2**20:.2f} MiB; repeats: load {args.repeats}, forward {args.forward_repeats}\n"
        )
        print(HEADER)
        for line in bench_load(model, adapters, device, args.repeats):
            print(line, flush=True)
        for line in bench_module(dims["hidden"], 16, batch, seq, dtype, device, args.module_repeats):
            print(line, flush=True)
        if not args.skip_forward:
            for line in bench_forward(
                model, adapters, device, batch, seq, args.forward_repeats, dims["vocab"]
            ):
                print(line, flush=True)
        if device.startswith("cuda"):
            for line in bench_7b_load(device, args.repeats, Path(td)):
                print(line, flush=True)
        elif args.quick:  # exercise the GPU-only section's code, scaled down
            for line in bench_7b_load(device, args.repeats, Path(td), hidden=512, layers=4):
                print(line, flush=True)
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model, few repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--forward-repeats", type=int, default=3)
    ap.add_argument("--module-repeats", type=int, default=31)
    ap.add_argument("--skip-forward", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gpu", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("# bench_engine: loraflight Engine vs PEFT\n")
    print(env_line())
    if args.quick:
        dims = dict(hidden=256, inter=704, layers=2, heads=4, vocab=1000)
        args.repeats, args.forward_repeats, args.module_repeats = 5, 2, 5
        section("CPU (quick)", "cpu", torch.float32, dims, 4, 64, args)
    else:
        dims = dict(hidden=1024, inter=2816, layers=8, heads=8, vocab=32000)
        section("CPU", "cpu", torch.float32, dims, 8, 128, args)
    if args.no_gpu or not torch.cuda.is_available():
        print("\n## GPU\n\nskipped: no CUDA")
    else:
        print(f"\nGPU: {torch.cuda.get_device_name()}")
        dims = dict(hidden=4096, inter=11008, layers=8, heads=32, vocab=32000)
        section("GPU (bf16)", "cuda", torch.bfloat16, dims, 32, 512, args)


if __name__ == "__main__":
    main()
