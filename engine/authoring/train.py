"""Train a LoRA card from examples: contrastive pairs (embedding models) or prompt/completion (causal LMs).

Theory of operation
-------------------
`LoRAInjection` freezes every parameter of the model it is given, then replaces each targeted
`nn.Linear` by a `LoRATrainLinear` that keeps the original Linear as `base` and adds two trainable
matrices: y = base(x) + scale · (dropout(x) @ Aᵀ) @ Bᵀ, scale = alpha/r (or alpha/√r for rsLoRA),
the same math the engine runs at inference. A starts Kaiming-uniform from the seed, B at zero, so
the wrapped model starts exactly at the base model. Only A and B are handed to the optimiser, and
every step checks that no other parameter received a gradient. `restore()` puts the original
modules and `requires_grad` flags back; base weights are never written.

`train_card` splits the records deterministically (seeded), evaluates the held-out split, trains,
evaluates again, and emits a card with `LoRACard.build` (module names relative to the model given).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from loraflight.errors import TrainingError

from ..card import CardMeta, LoRACard, ModuleLoRA, base_fingerprint, lora_scale
from .arrays import from_float
from .config import DEFAULT_TARGETS, HIGHER_IS_BETTER, KINDS, PRIMARY_METRIC, TrainConfig, problems_error
from .records import creation_time, load_dataset, split_records

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- LoRA wrapper

_torch: Any = None


def _t() -> Any:
    global _torch
    if _torch is None:
        import torch

        _torch = torch
    return _torch


def _make_wrapper_class() -> Any:
    torch = _t()
    nn = torch.nn
    module_base: Any = nn.Module

    class LoRATrainLinear(module_base):
        """A frozen Linear plus trainable A (r, in) and B (out, r): y = base(x) + s·(drop(x) Aᵀ) Bᵀ."""

        def __init__(
            self, base: Any, rank: int, alpha: float, dropout: float, scaling: str, generator: Any
        ) -> None:
            super().__init__()
            self.base = base
            self.rank = rank
            self.alpha = float(alpha)
            self.scale = lora_scale(float(alpha), rank, scaling)
            dev = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=torch.float32, device=dev))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=torch.float32, device=dev))
            with torch.no_grad():
                # PEFT's init: A ~ kaiming_uniform(a=√5) = U(-1/√in, 1/√in); B = 0 so training starts at the base.
                bound = 1.0 / math.sqrt(base.in_features)
                a = (
                    torch.rand(rank, base.in_features, generator=generator, dtype=torch.float32) * (2 * bound)
                    - bound
                )
                self.lora_A.copy_(a.to(dev))
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        def forward(self, x: Any) -> Any:
            y = self.base(x)
            h = self.lora_dropout(x).to(self.lora_A.dtype)
            return y + (self.scale * ((h @ self.lora_A.t()) @ self.lora_B.t())).to(y.dtype)

    return LoRATrainLinear


_WRAPPER: Any = None


def lora_train_linear_class() -> Any:
    """The trainable LoRA wrapper class (built on first use so importing this module needs no torch)."""
    global _WRAPPER
    if _WRAPPER is None:
        _WRAPPER = _make_wrapper_class()
    return _WRAPPER


@dataclasses.dataclass(frozen=True)
class ParamReport:
    """Parameter counts while LoRA is attached: trainable must equal lora."""

    trainable: int
    frozen: int
    lora: int
    total: int
    modules: int  # number of adapted Linear modules

    def __str__(self) -> str:
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"trainable {self.trainable:,} ({share:.3f} %) = LoRA {self.lora:,} over {self.modules} modules; "
            f"frozen {self.frozen:,}; total {self.total:,}"
        )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


class LoRAInjection:
    """Attach trainable LoRA to a model's Linear modules; `restore()` undoes it exactly.

    Usable as a context manager. While attached, every model parameter except the LoRA A/B has
    `requires_grad=False`.
    """

    def __init__(self, model: Any, config: TrainConfig) -> None:
        torch = _t()
        config.validate()
        self.model = model
        self.config = config
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n}
        if config.target_modules is None:
            targets = [n for n in linears if n.rsplit(".", 1)[-1] in DEFAULT_TARGETS]
            if not targets:
                targets = [
                    n for n in linears if n.rsplit(".", 1)[-1] not in ("lm_head", "score", "classifier")
                ]
            if not targets:
                raise TrainingError("the model has no nn.Linear modules to adapt")
        else:
            problems = []
            targets = []
            all_modules = dict(model.named_modules())
            for t in config.target_modules:
                hit = [n for n in linears if _matches(n, t)]
                if not hit:
                    other = [n for n in all_modules if n and _matches(n, t)]
                    if other:
                        kinds = sorted({type(all_modules[n]).__name__ for n in other})
                        problems.append(
                            f"target module {t!r} matches only non-Linear modules ({', '.join(kinds)}); a card adapts nn.Linear only"
                        )
                    else:
                        sample = sorted({n.rsplit(".", 1)[-1] for n in linears})[:12]
                        problems.append(
                            f"target module {t!r} matches no Linear in the model (Linear names end in: {', '.join(sample)})"
                        )
                targets.extend(h for h in hit if h not in targets)
            if problems:
                raise problems_error("target_modules do not fit the model", problems)
        self.targets: list[str] = sorted(targets, key=list(linears).index)
        self._flags = {id(p): (p, p.requires_grad) for p in model.parameters()}
        self._originals: dict[str, Any] = {}
        self.wrappers: dict[str, Any] = {}
        cls = lora_train_linear_class()
        gen = torch.Generator().manual_seed(config.seed)
        for p, _ in self._flags.values():
            p.requires_grad_(False)
        try:
            for name in self.targets:
                parent, attr = self._parent(name)
                base = getattr(parent, attr)
                w = cls(base, config.rank, config.alpha, config.dropout, config.scaling, gen)
                w.train(base.training)
                self._originals[name] = base
                setattr(parent, attr, w)
                self.wrappers[name] = w
        except BaseException:
            self.restore()
            raise
        self.attached = True

    def _parent(self, name: str) -> tuple[Any, str]:
        parent_name, _, attr = name.rpartition(".")
        return (self.model.get_submodule(parent_name) if parent_name else self.model), attr

    def lora_parameters(self) -> list[Any]:
        return [p for w in self.wrappers.values() for p in (w.lora_A, w.lora_B)]

    def frozen_parameters(self) -> list[Any]:
        lora = {id(p) for p in self.lora_parameters()}
        return [p for p in self.model.parameters() if id(p) not in lora]

    def report(self) -> ParamReport:
        """Counts from the model as it is now (attached): trainable, frozen, LoRA, total."""
        params = list(self.model.parameters())
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        lora = sum(p.numel() for p in self.lora_parameters())
        return ParamReport(trainable, total - trainable, lora, total, len(self.wrappers))

    def check_only_lora(self) -> None:
        """Raise TrainingError if anything but LoRA A/B requires or holds a gradient."""
        lora = {id(p) for p in self.lora_parameters()}
        named = dict(self.model.named_parameters())
        bad = [n for n, p in named.items() if id(p) not in lora and (p.requires_grad or p.grad is not None)]
        if bad:
            raise TrainingError(
                f"parameters outside LoRA became trainable or received a gradient: {', '.join(bad[:10])}"
            )

    def to_modules(self, dtype: str = "float32") -> list[ModuleLoRA]:
        """The trained A and B of each module as card rows."""
        out = []
        for name, w in self.wrappers.items():
            a = w.lora_A.detach().to("cpu", _t().float32).numpy()
            b = w.lora_B.detach().to("cpu", _t().float32).numpy()
            out.append(ModuleLoRA(name, w.rank, w.alpha, from_float(a, dtype), from_float(b, dtype)))
        return out

    def shapes(self) -> list[tuple[str, int, int]]:
        return [(n, w.base.in_features, w.base.out_features) for n, w in self.wrappers.items()]

    def restore(self) -> None:
        """Put the original Linear modules and requires_grad flags back."""
        for name, base in self._originals.items():
            parent, attr = self._parent(name)
            setattr(parent, attr, base)
        self._originals = {}
        for p, flag in self._flags.values():
            p.requires_grad_(flag)
        self.attached = False

    def __enter__(self) -> LoRAInjection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


# --------------------------------------------------------------------------- losses and metrics


def pair_loss(model: Any, tokenizer: Any, batch: Sequence[Mapping[str, str]], cfg: TrainConfig) -> Any:
    """InfoNCE with in-batch negatives (plus any hard negatives); duplicate positives are masked."""
    from .models import encode

    torch = _t()
    anchors = [r["anchor"] for r in batch]
    cands = [r["positive"] for r in batch] + [r["negative"] for r in batch if "negative" in r]
    ea = encode(model, tokenizer, anchors, max_length=cfg.max_length)
    ec = encode(model, tokenizer, cands, max_length=cfg.max_length)
    logits = ea @ ec.t() / cfg.temperature
    same = torch.tensor([[c == r["positive"] for c in cands] for r in batch], device=logits.device)
    label = torch.arange(len(batch), device=logits.device)
    same[label, label] = False
    logits = logits.masked_fill(same, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, label)


def _completion_batch(
    tokenizer: Any, batch: Sequence[Mapping[str, str]], max_length: int
) -> tuple[Any, Any, Any]:
    torch = _t()
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = eos if eos is not None else 0
    rows, labels = [], []
    for r in batch:
        p = list(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        c = list(tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
        head = ([bos] if bos is not None else []) + p
        tail = c + ([eos] if eos is not None else [])
        ids = (head + tail)[:max_length]
        lab = ([-100] * len(head) + tail)[:max_length]
        rows.append(ids)
        labels.append(lab)
    width = max(len(r) for r in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return ids_t, mask, lab_t


def _completion_nll(
    model: Any, tokenizer: Any, batch: Sequence[Mapping[str, str]], max_length: int
) -> tuple[Any, int]:
    """(sum of completion-token NLL, token count) for a batch."""
    torch = _t()
    ids, mask, labels = _completion_batch(tokenizer, batch, max_length)
    dev = _device(model)
    ids, mask, labels = ids.to(dev), mask.to(dev), labels.to(dev)
    out = model(input_ids=ids, attention_mask=mask)
    logits = out.logits if hasattr(out, "logits") else out[0]
    shift_logits = logits[:, :-1, :].contiguous().float()
    shift_labels = labels[:, 1:].contiguous()
    nll = torch.nn.functional.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)),
        shift_labels.view(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return nll, int((shift_labels != -100).sum())


def _device(model: Any) -> Any:
    for p in model.parameters():
        return p.device
    return _t().device("cpu")


def evaluate(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, str]],
    kind: str = "pairs",
    *,
    max_length: int = 64,
    batch_size: int = 32,
) -> dict[str, float]:
    """Held-out metrics of `model` as it is now (e.g. with a card loaded through the engine).

    pairs: pos_cosine (mean cosine of each anchor with its positive), neg_cosine (mean cosine with the
    other positives and hard negatives), margin = pos − neg (higher is better), accuracy (share of
    anchors whose nearest candidate is their positive). completion: loss (mean NLL per completion
    token; lower is better) and perplexity. The model is evaluated in eval mode and left as it was.
    """
    torch = _t()
    if kind not in KINDS:
        raise TrainingError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not records:
        raise TrainingError("nothing to evaluate: no records")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            if kind == "pairs":
                return _eval_pairs(model, tokenizer, records, max_length, batch_size)
            total, count = 0.0, 0
            for i in range(0, len(records), batch_size):
                nll, n = _completion_nll(model, tokenizer, records[i : i + batch_size], max_length)
                total += float(nll)
                count += n
            loss = total / max(count, 1)
            return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "tokens": float(count)}
    finally:
        model.train(was_training)


def _eval_pairs(
    model: Any, tokenizer: Any, records: Sequence[Mapping[str, str]], max_length: int, batch_size: int
) -> dict[str, float]:
    from .models import encode

    if len(records) < 2:
        raise TrainingError("evaluating pairs needs at least 2 records (the others are the negatives)")
    torch = _t()
    anchors = [r["anchor"] for r in records]
    cands = list(
        dict.fromkeys([r["positive"] for r in records] + [r["negative"] for r in records if "negative" in r])
    )

    def emb(texts: list[str]) -> Any:
        return torch.cat(
            [
                encode(model, tokenizer, texts[i : i + batch_size], max_length=max_length)
                for i in range(0, len(texts), batch_size)
            ]
        )

    sim = (emb(anchors) @ emb(cands).t()).double().cpu().numpy()
    index = {c: j for j, c in enumerate(cands)}
    pos = np.array([sim[i, index[r["positive"]]] for i, r in enumerate(records)])
    neg_mask = np.ones_like(sim, dtype=bool)
    for i, r in enumerate(records):
        neg_mask[i, index[r["positive"]]] = False
    neg = sim[neg_mask]
    correct = [int(np.argmax(sim[i])) == index[r["positive"]] for i, r in enumerate(records)]
    pos_c, neg_c = float(pos.mean()), float(neg.mean())
    return {
        "pos_cosine": pos_c,
        "neg_cosine": neg_c,
        "margin": pos_c - neg_c,
        "accuracy": float(np.mean(correct)),
    }


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    """What `train_card` made and measured."""

    card: LoRACard
    metric: str  # the primary metric: "margin" (pairs, higher is better) or "loss" (completion, lower)
    before: dict[str, float]  # held-out metrics of the base model
    after: dict[str, float]  # held-out metrics with the trained LoRA
    report: ParamReport
    steps: int
    losses: list[float]
    train_size: int
    eval_size: int
    seconds: float
    config: TrainConfig
    note: str = ""  # why fewer steps ran than max_steps asked for ("" when not)

    @property
    def improved(self) -> bool:
        b, a = self.before[self.metric], self.after[self.metric]
        return a > b if HIGHER_IS_BETTER[self.metric] else a < b

    def summary(self) -> str:
        b, a = self.before[self.metric], self.after[self.metric]
        verdict = "better" if self.improved else "not better"
        steps = f"{self.steps} step{'' if self.steps == 1 else 's'}"
        note = f" ({self.note})" if self.note else ""
        return f"held-out {self.metric}: {b:.4f} -> {a:.4f} ({verdict}) after {steps}{note}"


ProgressFn = Callable[[int, int, float], None]


def train_card(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, str]] | str | os.PathLike[str],
    config: TrainConfig | None = None,
    *,
    meta: CardMeta | None = None,
    name: str | None = None,
    key: Ed25519PrivateKey | None = None,
    progress: ProgressFn | None = None,
    created: str | None = None,
) -> TrainResult:
    """Train LoRA on `records` and return the card with held-out metrics before and after.

    `records` is a list of dicts or a JSONL path (validated with `load_dataset`). `meta` names and
    describes the card (``name=`` alone is shorthand for ``CardMeta(name)``); `key` signs it. `progress(step, total_steps, loss)` is called after every step. The
    model is returned to its original modules, flags and train/eval mode; base weights are untouched.
    `created` is the card's creation time (default `records.creation_time`: SOURCE_DATE_EPOCH, the
    data file's time, else the Unix epoch), so the same data, config and seed give the same card bytes.
    """
    torch = _t()
    meta = CardMeta.given(meta, name)  # validated now, not after minutes of training
    cfg = (config or TrainConfig()).validate()
    data = load_dataset(records, cfg.kind)
    train, held = split_records(data, cfg.eval_fraction, cfg.seed, cfg.kind)
    t0 = time.perf_counter()
    before = evaluate(model, tokenizer, held, cfg.kind, max_length=cfg.max_length)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    if cfg.kind == "pairs" and len(train) < 2:
        raise TrainingError("contrastive training needs at least 2 training pairs")
    created_at = creation_time(created, records if isinstance(records, str | os.PathLike) else None)
    note = ""
    if cfg.max_steps is not None and cfg.max_steps > steps_per_epoch * cfg.epochs:
        note = (
            f"max_steps {cfg.max_steps} is only an upper bound: {cfg.epochs} epoch(s) of {len(train)} "
            f"examples in batches of {cfg.batch_size} give {steps_per_epoch * cfg.epochs} step(s); "
            "raise epochs to train longer"
        )

    was_training = model.training
    det_was = torch.are_deterministic_algorithms_enabled()
    det_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    rng_state = torch.random.get_rng_state()
    losses: list[float] = []
    inj = LoRAInjection(model, cfg)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.manual_seed(cfg.seed)
        order_rng = random.Random(cfg.seed)
        report = inj.report()
        if report.trainable != report.lora:
            raise TrainingError(f"only LoRA parameters may train, but {report}")
        opt = torch.optim.AdamW(inj.lora_parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
        model.train()
        step = 0
        for _epoch in range(cfg.epochs):
            order = list(range(len(train)))
            order_rng.shuffle(order)
            for s in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[s * cfg.batch_size : (s + 1) * cfg.batch_size]
                if cfg.kind == "pairs" and len(idx) < 2:
                    continue  # a last batch of one pair has no negatives
                batch = [train[i] for i in idx]
                if cfg.kind == "pairs":
                    loss = pair_loss(model, tokenizer, batch, cfg)
                else:
                    nll, n = _completion_nll(model, tokenizer, batch, cfg.max_length)
                    loss = nll / max(n, 1)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"the loss became {float(loss)} at step {step + 1}; lower learning_rate (now {cfg.learning_rate})"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                inj.check_only_lora()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(inj.lora_parameters(), cfg.grad_clip)
                opt.step()
                step += 1
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(step, total, losses[-1])
            if step >= total:
                break
        opt.zero_grad(set_to_none=True)
        after = evaluate(model, tokenizer, held, cfg.kind, max_length=cfg.max_length)
        modules = inj.to_modules(cfg.dtype)
        shapes = inj.shapes()
    finally:
        inj.restore()
        model.train(was_training)
        torch.use_deterministic_algorithms(det_was, warn_only=det_warn)
        torch.random.set_rng_state(rng_state)
    metric = PRIMARY_METRIC[cfg.kind]
    training = {
        "kind": cfg.kind,
        "metric": metric,
        "before": _finite(before[metric]),
        "after": _finite(after[metric]),
        "steps": step,
        "seed": cfg.seed,
        "examples": len(train),
        "held_out": len(held),
    }
    card = LoRACard.build(
        modules,
        **meta.as_kwargs(),
        dtype=cfg.dtype,
        base_fingerprint=base_fingerprint(shapes),
        scaling=cfg.scaling,
        created=created_at,
        extra={"training": training},
    )
    if key is not None:
        card = card.sign(key)
    seconds = time.perf_counter() - t0
    log.info("trained %s: %s (%s)", card.ref, training, report)
    return TrainResult(
        card, metric, before, after, report, step, losses, len(train), len(held), seconds, cfg, note
    )


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


__all__ = [
    "DEFAULT_TARGETS",
    "KINDS",
    "LoRAInjection",
    "ParamReport",
    "ProgressFn",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "load_dataset",
    "lora_train_linear_class",
    "pair_loss",
    "split_records",
    "train_card",
]
