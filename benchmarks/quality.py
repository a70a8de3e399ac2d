"""Does the mixer help? LoRA against MoSLoRA on a real transfer task, many seeds, on a CPU.

A small byte-level transformer is pretrained on Python source (the standard
library's own files) and then adapted to English prose (the pydoc topics that
ship with CPython): nothing to download. Every method gets the same rank, the
same targets (all attention and MLP projections), the same number of steps
and its own learning rate, picked from a small sweep on a validation split.
Final numbers are on a separate held-out test split.

Methods: lora (identity mixer, frozen), braid (the fixed butterfly mixer
[[I, I], [I, I]], frozen), moslora_kaiming (trainable mixer, Kaiming init, as
released), moslora_orthogonal (trainable mixer, orthogonal init); full
fine-tuning as a reference line.

    python benchmarks/quality.py            # ~15 min on 2 CPU cores: LR sweep + 5 seeds per method
    python benchmarks/quality.py --quick    # <3 min: fixed LRs, 3 seeds, fewer steps

Prints a table (mean ± sd of test loss and bits per byte, time per step
relative to LoRA, trainable parameters, and a two-sided Mann-Whitney U
p-value of each MoSLoRA variant against LoRA), and writes <out>/quality.json
and <out>/quality.png (validation curves and final losses per seed). The
pretrained model is cached in <out>. Runs are deterministic for given seeds.
"""

import argparse
import copy
import glob
import itertools
import json
import math
import os
import statistics
import sys
import sysconfig
import time

import torch
import torch.nn.functional as F
from torch import nn

import moslora_ext

CONTEXT = 128
RANK, ALPHA = 8, 16
TARGETS = ["q", "k", "v", "o", "up", "down"]
METHODS = {  # name: adapter settings (None: full fine-tuning)
    "lora": {"mixer_init": "identity", "train_mixer": False},
    "braid": {"mixer_init": "braid", "train_mixer": False},
    "moslora_kaiming": {"mixer_init": "kaiming", "train_mixer": True},
    "moslora_orthogonal": {"mixer_init": "orthogonal", "train_mixer": True},
    "full": None,
}
LEARNING_RATES = {"adapter": [1e-3, 3e-3, 1e-2, 3e-2], "full": [3e-4, 1e-3, 3e-3, 1e-2]}
DEFAULT_LR = {"adapter": 1e-2, "full": 3e-3}  # --quick uses these without a sweep


# --- model --------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(batch, length, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ByteLM(nn.Module):
    """A small pre-norm transformer over bytes."""

    def __init__(self, width=128, depth=4, heads=4):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)

    def forward(self, ids):
        x = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def loss_on(model, ids):
    logits = model(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))


# --- data ---------------------------------------------------------------------------------------


def python_source_bytes(limit=4_000_000):
    """The standard library's Python files, in a fixed order, up to limit bytes."""
    stdlib = sysconfig.get_paths()["stdlib"]
    data = bytearray()
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, "rb") as f:
            data += f.read()
        if len(data) >= limit:
            break
    return torch.frombuffer(data[:limit], dtype=torch.uint8).long()


def prose_splits():
    """pydoc's English topic texts, split by topic into train / validation / test (90/5/5)."""
    from pydoc_data.topics import topics

    texts = [topics[name].encode() for name in sorted(topics)]
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    cut1, cut2 = int(0.9 * len(texts)), int(0.95 * len(texts))
    parts = ([texts[i] for i in order[:cut1]], [texts[i] for i in order[cut1:cut2]], [texts[i] for i in order[cut2:]])
    return [torch.frombuffer(bytearray(b"\n".join(p)), dtype=torch.uint8).long() for p in parts]


def random_windows(data, batch, generator):
    starts = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=generator).tolist()
    return torch.stack([data[s:s + CONTEXT + 1] for s in starts])


def fixed_windows(data, count):
    """count evenly spaced windows: a fixed evaluation set."""
    step = (len(data) - CONTEXT - 1) // count
    return torch.stack([data[i * step:i * step + CONTEXT + 1] for i in range(count)])


@torch.no_grad()
def evaluate(model, windows, batch=64):
    model.eval()
    total = sum(loss_on(model, windows[i:i + batch]).item() * len(windows[i:i + batch])
                for i in range(0, len(windows), batch))
    model.train()
    return total / len(windows)


def cosine_lr(optimizer, steps):
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the learning rate."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


# --- pretraining --------------------------------------------------------------------------------


def pretrained_model(args, log):
    path = os.path.join(args.out, f"quality-pretrained-{args.pretrain_steps}.pt")
    if os.path.exists(path):
        model = ByteLM()
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"pretrained model: loaded from {path}")
        return model
    torch.manual_seed(0)
    model = ByteLM()
    data = python_source_bytes()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = cosine_lr(optimizer, args.pretrain_steps)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(1, args.pretrain_steps + 1):
        loss = loss_on(model, random_windows(data, 32, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == args.pretrain_steps:
            log(f"pretraining on Python source: step {step}/{args.pretrain_steps}, loss {loss.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)")
    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


# --- fine-tuning --------------------------------------------------------------------------------


def prepare(base, method, seed):
    """A copy of the pretrained model set up for method; the seed draws the adapter init."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    settings = METHODS[method]
    if settings is not None:
        moslora_ext.add_adapters(model, TARGETS, r=RANK, lora_alpha=ALPHA, **settings)
    return model


def finetune(base, method, lr, seed, data, args):
    """Train, evaluating on the validation windows every eval_every steps.
    Returns the validation curve, the trained model and the median step time."""
    train, val_windows = data["train"], data["val"]
    model = prepare(base, method, seed)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    schedule = cosine_lr(optimizer, args.steps)
    generator = torch.Generator().manual_seed(1000 + seed)
    curve, step_times = [(0, evaluate(model, val_windows))], []
    for step in range(1, args.steps + 1):
        ids = random_windows(train, args.batch, generator)
        begin = time.perf_counter()
        loss = loss_on(model, ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        step_times.append(time.perf_counter() - begin)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val_windows)))
    return curve, model, statistics.median(step_times)


def kind(method):
    return "full" if METHODS[method] is None else "adapter"


def mann_whitney_u(a, b):
    """Two-sided Mann-Whitney U test, exact (enumerating every split of the
    pooled ranks, ties averaged): returns (U of a, p)."""
    pooled = sorted((v, i) for i, v in enumerate(list(a) + list(b)))
    ranks = [0.0] * len(pooled)
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        for t in range(i, j + 1):
            ranks[pooled[t][1]] = (i + j) / 2 + 1
        i = j + 1
    n, m = len(a), len(b)
    offset = n * (n + 1) / 2
    u = sum(ranks[:n]) - offset
    centre = n * m / 2
    splits = [sum(ranks[k] for k in chosen) - offset for chosen in itertools.combinations(range(n + m), n)]
    extreme = sum(abs(s - centre) >= abs(u - centre) - 1e-9 for s in splits)
    return u, extreme / len(splits)


# --- reporting ----------------------------------------------------------------------------------


def summarise(results, methods):
    rows = {}
    lora_time = statistics.median(results["lora"]["step_s"]) if "lora" in results else None
    for method in methods:
        r = results[method]
        losses = r["test_loss"]
        mean, sd = statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0
        rows[method] = {
            "lr": r["lr"], "seeds": len(losses),
            "test_loss_mean": mean, "test_loss_sd": sd,
            "bits_per_byte_mean": mean / math.log(2), "bits_per_byte_sd": sd / math.log(2),
            "step_time_vs_lora": statistics.median(r["step_s"]) / lora_time if lora_time else None,
            "trainable_parameters": r["trainable"],
        }
        if method.startswith("moslora") and "lora" in results:
            u, p = mann_whitney_u(losses, results["lora"]["test_loss"])
            rows[method]["mann_whitney_u_vs_lora"] = u
            rows[method]["p_vs_lora"] = p
    return rows


def format_table(rows, pretrained_loss):
    lines = [f"pretrained model before adaptation: test loss {pretrained_loss:.4f} "
             f"({pretrained_loss / math.log(2):.4f} bits/byte)",
             f"{'method':<20}{'lr':>8}{'seeds':>6}{'test loss':>20}{'bits/byte':>18}{'step/lora':>11}"
             f"{'trainable':>11}{'p vs lora':>11}"]
    lines.append("-" * len(lines[-1]))
    for method, row in rows.items():
        p = row.get("p_vs_lora")
        lines.append(
            f"{method:<20}{row['lr']:>8.0e}{row['seeds']:>6}"
            f"{row['test_loss_mean']:>12.4f} ± {row['test_loss_sd']:.4f}"
            f"{row['bits_per_byte_mean']:>10.4f} ± {row['bits_per_byte_sd']:.4f}"
            f"{row['step_time_vs_lora'] or float('nan'):>11.2f}{row['trainable_parameters']:>11,}"
            f"{'-' if p is None else format(p, '.3f'):>11}")
    return "\n".join(lines)


def plot(results, methods, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, finals) = plt.subplots(1, 2, figsize=(13, 4.5))
    for i, method in enumerate(methods):
        runs = results[method]["curves"]
        steps = [s for s, _ in runs[0]]
        values = torch.tensor([[v for _, v in run] for run in runs])
        mean = values.mean(0)
        sd = values.std(0) if len(runs) > 1 else torch.zeros_like(mean)
        curves.plot(steps, mean, label=method, color=f"C{i}")
        curves.fill_between(steps, mean - sd, mean + sd, alpha=0.2, color=f"C{i}")
        finals.scatter([i] * len(results[method]["test_loss"]), results[method]["test_loss"], color=f"C{i}")
    curves.set(xlabel="step", ylabel="validation loss (nats/byte)", title="adaptation to English prose (mean ± sd)")
    curves.set_ylim(top=min(curves.get_ylim()[1], 1.6 * min(min(r["test_loss"]) for r in results.values())))
    curves.legend()
    finals.set_xticks(range(len(methods)), methods, rotation=20)
    finals.set(ylabel="test loss", title="final test loss, one point per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fixed learning rates, 3 seeds, 50 steps, a shorter pretraining")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--no-sweep", action="store_true", help="use the default learning rates")
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.no_sweep = min(args.seeds, 3), min(args.steps, 50), True
        args.pretrain_steps = min(args.pretrain_steps, 250)
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    base = pretrained_model(args, log)
    train, val, test = prose_splits()
    data = {"train": train, "val": fixed_windows(val, 64)}
    test_windows = fixed_windows(test, 128)
    pretrained_loss = evaluate(base, test_windows)

    results = {}
    for method in args.methods:
        candidates = [DEFAULT_LR[kind(method)]] if args.no_sweep else LEARNING_RATES[kind(method)]
        sweep = {}
        for lr in candidates:  # chosen on the validation split with seed 0
            sweep[lr] = finetune(base, method, lr, 0, data, args)
            log(f"{method}: lr {lr:.0e} -> validation loss {sweep[lr][0][-1][1]:.4f}")
        lr = min(sweep, key=lambda c: sweep[c][0][-1][1])
        runs = [sweep[lr]] + [finetune(base, method, lr, seed, data, args) for seed in range(1, args.seeds)]
        results[method] = {
            "lr": lr, "sweep": {str(c): s[0][-1][1] for c, s in sweep.items()},
            "curves": [curve for curve, _, _ in runs],
            "test_loss": [evaluate(model, test_windows) for _, model, _ in runs],
            "step_s": [t for _, _, t in runs],
            "trainable": moslora_ext.trainable_parameters(runs[0][1])[0],
        }
        log(f"{method}: lr {lr:.0e}, test loss per seed {[round(v, 4) for v in results[method]['test_loss']]}")

    rows = summarise(results, args.methods)
    print(format_table(rows, pretrained_loss))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "pretrained_test_loss": pretrained_loss, "summary": rows, "runs": results,
                   "seconds": time.perf_counter() - start}, f, indent=1)
    log(f"wrote {args.out}/quality.json")
    try:
        plot(results, args.methods, os.path.join(args.out, "quality.png"))
        log(f"wrote {args.out}/quality.png")
    except ImportError:
        log("matplotlib is not installed: no plot")
    return rows


if __name__ == "__main__":
    main()
