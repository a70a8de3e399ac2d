"""Does the mixer help? LoRA against MoSLoRA variants on two transfer tasks, many seeds, on a CPU.

Two tasks, nothing downloaded:

  prose   a byte-level transformer pretrained on Python source (the standard
          library's own files) and adapted to English prose (the pydoc topics
          that ship with CPython); adapters on every attention and MLP
          projection; test loss in nats per byte (and bits per byte).
  digits  a small vision transformer pretrained on scikit-learn's 8x8 digits
          0-4 and adapted to the digits 5-9 with a new classification head
          (trained by every method); adapters on the query and value
          projections only, as in the LoRA paper; test loss and accuracy.

Methods: lora (identity mixer, frozen), braid (the fixed butterfly mixer
[[I, I], [I, I]], frozen), and MoSLoRA (trainable mixer) with the mixer drawn
four ways: kaiming (as released), kaiming_rescaled (the same draw scaled to
the identity's Frobenius norm), orthogonal, identity (the layer starts as LoRA
and learns to mix); full fine-tuning as a reference line.

Protocol, per task: every method gets r = 8 (alpha = 2r), the same steps and
its own learning rate, the best of a sweep on the validation split with seed 0;
a method with a trainable mixer then also tries its mixer at 10x that learning
rate and keeps it if validation improves. With those settings it runs the
other seeds; the seed draws the adapter init (and the new head) and the batch
order. Final numbers are on a separate held-out test split. Then r = 4 and 16,
same protocol, for LoRA and for the MoSLoRA variant with the best mean
validation loss at r = 8.

    python benchmarks/quality.py            # about 15 min on 2 CPU cores, pretraining included
    python benchmarks/quality.py --quick    # <3 min: fixed learning rates, 3 seeds, fewer steps, r = 4 and 8

Prints a table per task and rank (mean ± sd over seeds of the test metrics,
time per step relative to LoRA, trainable parameters, and the two-sided exact
Mann-Whitney U p-value of the test loss against LoRA), and writes
<out>/quality.json and <out>/quality.png (validation curves, test loss per
seed, test loss against rank). The pretrained models are cached in <out>.
Runs use one thread by default, so they are deterministic for given seeds
whatever the machine's core count.
"""

import argparse
import copy
import dataclasses
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

RANK = 8  # every method is compared at this rank
OTHER_RANKS = [4, 16]  # then LoRA and the best MoSLoRA variant at these
ALPHA_PER_RANK = 2  # lora_alpha = 2r: the same scale alpha / r at every rank, so a rank is not also a step size
MIXER_LR_MULTIPLIERS = [1, 10]  # the first is the one used without a sweep
LEARNING_RATES = {"adapter": [3e-3, 1e-2, 3e-2], "full": [1e-3, 3e-3, 1e-2]}  # the same for both tasks
DEFAULT_LR = {"adapter": 1e-2, "full": 3e-3}  # without a sweep


@dataclasses.dataclass(frozen=True)
class Method:
    mixer_init: str
    train_mixer: bool
    # Scale the drawn mixer to the identity's Frobenius norm sqrt(r), the norm of the
    # orthogonal mixer too: the same gain on a random direction, so the same initial
    # update size (Kaiming-uniform with a = sqrt(5) has about sqrt(r / 3)).
    identity_norm: bool = False


METHODS = {  # name: adapter settings (None: full fine-tuning)
    "lora": Method("identity", train_mixer=False),
    "braid": Method("braid", train_mixer=False),
    "moslora_kaiming": Method("kaiming", train_mixer=True),
    "moslora_kaiming_rescaled": Method("kaiming", train_mixer=True, identity_norm=True),
    "moslora_orthogonal": Method("orthogonal", train_mixer=True),
    "moslora_identity": Method("identity", train_mixer=True),
    "full": None,
}


def kind(method):
    return "full" if METHODS[method] is None else "adapter"


def trains_mixer(method):
    return METHODS[method] is not None and METHODS[method].train_mixer


@dataclasses.dataclass(frozen=True)
class Schedule:
    pretrain_steps: int
    steps: int  # fine-tuning steps per run
    batch: int
    eval_every: int


# --- models -------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        batch, length, width = x.shape
        h = self.norm1(x)
        q, k, v = (proj(h).view(batch, length, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.o(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class Transformer(nn.Module):
    """A small pre-norm transformer: token embedding, learnt positions, blocks, a linear head per token."""

    def __init__(self, embed, length, outputs, causal, width, depth=4, heads=4):
        super().__init__()
        self.embed = embed
        self.position = nn.Parameter(torch.zeros(length, width))
        self.blocks = nn.ModuleList(Block(width, heads, causal) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, outputs, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# --- task 1: Python source -> English prose -----------------------------------------------------


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


class Prose:
    """Next-byte prediction. Data sets are 1-tuples of (windows, context + 1) of byte ids."""

    name = "prose"
    context = 64
    targets = ["q", "k", "v", "o", "up", "down"]
    trained_modules = ()  # besides the adapters
    pretrain_batch = 16
    schedule = Schedule(pretrain_steps=400, steps=80, batch=8, eval_every=20)
    quick_schedule = Schedule(pretrain_steps=100, steps=20, batch=8, eval_every=10)

    def __init__(self):
        train, val, test = prose_splits()
        self.train = train
        self.val, self.test = (self.fixed_windows(val, 96),), (self.fixed_windows(test, 256),)
        self.source = None  # the pretraining text, read only if a pretraining runs

    def new_model(self):
        return Transformer(nn.Embedding(256, 128), self.context, outputs=256, causal=True, width=128)

    def random_windows(self, data, batch, generator):
        starts = torch.randint(0, len(data) - self.context - 1, (batch,), generator=generator).tolist()
        return (torch.stack([data[s:s + self.context + 1] for s in starts]),)

    def fixed_windows(self, data, count):
        """count evenly spaced windows: a fixed evaluation set."""
        step = (len(data) - self.context - 1) // count
        return torch.stack([data[i * step:i * step + self.context + 1] for i in range(count)])

    def pretraining_batch(self, batch, generator):
        if self.source is None:
            self.source = python_source_bytes()
        return self.random_windows(self.source, batch, generator)

    def training_batch(self, batch, generator):
        return self.random_windows(self.train, batch, generator)

    def for_adaptation(self, pretrained):
        return copy.deepcopy(pretrained)

    def loss(self, model, ids):
        logits = model(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1))

    def measure(self, model, ids):
        loss = self.loss(model, ids).item()
        return {"loss": loss, "bits_per_byte": loss / math.log(2)}


# --- task 2: digits 0-4 -> digits 5-9 -----------------------------------------------------------


class Digits:
    """Classification of scikit-learn's 8x8 digits as 16 patches of 2x2 pixels (mean-pooled logits).
    Data sets are (patches (n, 16, 4), labels (n,)) pairs."""

    name = "digits"
    targets = ["q", "v"]
    trained_modules = ("head",)  # the new classes' head, trained by every method
    pretrain_batch = 64
    schedule = Schedule(pretrain_steps=600, steps=150, batch=32, eval_every=25)
    quick_schedule = Schedule(pretrain_steps=200, steps=40, batch=32, eval_every=10)
    width, classes = 64, 5

    def __init__(self):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32) / 16
        patches = images.unfold(1, 2, 2).unfold(2, 2, 2).reshape(len(images), 16, 4)
        labels = torch.tensor(digits.target)
        old = labels < self.classes
        self.pretraining = (patches[old], labels[old])
        new_patches, new_labels = patches[~old], labels[~old] - self.classes
        order = torch.randperm(len(new_labels), generator=torch.Generator().manual_seed(0))
        cut1, cut2 = int(0.3 * len(order)), int(0.6 * len(order))  # train / validation / test: 30/30/40
        self.train, self.val, self.test = ((new_patches[part], new_labels[part])
                                           for part in (order[:cut1], order[cut1:cut2], order[cut2:]))

    def new_model(self):
        return Transformer(nn.Linear(4, self.width), 16, outputs=self.classes, causal=False, width=self.width)

    @staticmethod
    def random_batch(data, batch, generator):
        chosen = torch.randint(0, len(data[1]), (batch,), generator=generator)
        return tuple(t[chosen] for t in data)

    def pretraining_batch(self, batch, generator):
        return self.random_batch(self.pretraining, batch, generator)

    def training_batch(self, batch, generator):
        return self.random_batch(self.train, batch, generator)

    def for_adaptation(self, pretrained):
        """A copy with a new head for the new classes, drawn from the current random state."""
        model = copy.deepcopy(pretrained)
        model.head = nn.Linear(self.width, self.classes, bias=False)
        return model

    def loss(self, model, patches, labels):
        return F.cross_entropy(model(patches).mean(1), labels)

    def measure(self, model, patches, labels):
        logits = model(patches).mean(1)
        return {"loss": F.cross_entropy(logits, labels).item(),
                "accuracy": (logits.argmax(1) == labels).float().mean().item()}


TASKS = {task.name: task for task in (Prose, Digits)}


# --- training -----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(task, model, data, batch=128):
    """task.measure averaged over data (a tuple of tensors), in eval mode."""
    model.eval()
    count, totals = len(data[0]), {}
    for i in range(0, count, batch):
        part = [t[i:i + batch] for t in data]
        for name, value in task.measure(model, *part).items():
            totals[name] = totals.get(name, 0.0) + value * len(part[0])
    model.train()
    return {name: total / count for name, total in totals.items()}


def cosine_lr(optimizer, steps):
    """Linear warm-up over 5 % of the steps, then cosine decay to 10 % of the learning rate."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))


def pretrained_model(task, schedule, args, log):
    path = os.path.join(args.out, f"quality-{task.name}-pretrained-{schedule.pretrain_steps}.pt")
    torch.manual_seed(0)
    model = task.new_model()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"{task.name}: pretrained model loaded from {path}")
        return model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    lr_schedule = cosine_lr(optimizer, schedule.pretrain_steps)
    generator = torch.Generator().manual_seed(0)
    for step in range(1, schedule.pretrain_steps + 1):
        loss = task.loss(model, *task.pretraining_batch(task.pretrain_batch, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % 100 == 0 or step == schedule.pretrain_steps:
            log(f"{task.name}: pretraining step {step}/{schedule.pretrain_steps}, loss {loss.item():.3f}")
    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def prepare(task, pretrained, method, rank, seed):
    """A copy of the pretrained model set up for method; the seed draws the adapter init and any new head."""
    torch.manual_seed(seed)
    model = task.for_adaptation(pretrained)
    settings = METHODS[method]
    if settings is not None:
        moslora_ext.add_adapters(model, task.targets, r=rank, lora_alpha=ALPHA_PER_RANK * rank,
                                 mixer_init=settings.mixer_init, train_mixer=settings.train_mixer)
        if settings.identity_norm:
            with torch.no_grad():
                for layer in moslora_ext.adapted_layers(model).values():
                    layer.lora_mixer.mul_(math.sqrt(rank) / layer.lora_mixer.norm())
        for name in task.trained_modules:
            model.get_submodule(name).requires_grad_(True)
    return model


def parameter_groups(model, lr, mixer_lr_multiplier):
    """The trainable parameters, the mixers at lr * mixer_lr_multiplier and the rest at lr."""
    mixers = {id(layer.lora_mixer) for layer in moslora_ext.adapted_layers(model).values()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in mixers], "lr": lr},
              {"params": [p for p in trainable if id(p) in mixers], "lr": lr * mixer_lr_multiplier}]
    return [group for group in groups if group["params"]]


def finetune(task, pretrained, method, rank, lr, mixer_lr_multiplier, seed, schedule):
    """Train, evaluating on the validation split every eval_every steps.
    Returns the validation loss curve, the trained model and the median step time."""
    model = prepare(task, pretrained, method, rank, seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, lr, mixer_lr_multiplier), weight_decay=0.0)
    lr_schedule = cosine_lr(optimizer, schedule.steps)
    generator = torch.Generator().manual_seed(1000 + seed)
    curve, step_times = [(0, evaluate(task, model, task.val)["loss"])], []
    for step in range(1, schedule.steps + 1):
        batch = task.training_batch(schedule.batch, generator)
        begin = time.perf_counter()
        loss = task.loss(model, *batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        step_times.append(time.perf_counter() - begin)
        if step % schedule.eval_every == 0 or step == schedule.steps:
            curve.append((step, evaluate(task, model, task.val)["loss"]))
    return curve, model, statistics.median(step_times)


def study(task, pretrained, method, rank, schedule, args, log):
    """Pick the learning rate, then the mixer's multiplier, on validation with seed 0; run the other seeds."""
    def run(lr, multiplier, seed):
        return finetune(task, pretrained, method, rank, lr, multiplier, seed, schedule)

    def final_val_loss(settings):
        return sweep[settings][0][-1][1]

    sweep = {}  # (lr, mixer multiplier): seed 0's run
    for lr in [DEFAULT_LR[kind(method)]] if args.no_sweep else LEARNING_RATES[kind(method)]:
        sweep[lr, MIXER_LR_MULTIPLIERS[0]] = run(lr, MIXER_LR_MULTIPLIERS[0], 0)
    lr = min(sweep, key=final_val_loss)[0]
    if trains_mixer(method) and not args.no_sweep:
        for multiplier in MIXER_LR_MULTIPLIERS[1:]:
            sweep[lr, multiplier] = run(lr, multiplier, 0)
    for settings in sweep:
        log(f"{task.name} r={rank} {method}: lr {settings[0]:.0e}, mixer lr x{settings[1]} "
            f"-> validation loss {final_val_loss(settings):.4f}")
    lr, multiplier = min(sweep, key=final_val_loss)
    runs = [sweep[lr, multiplier]] + [run(lr, multiplier, seed) for seed in range(1, args.seeds)]
    tests = [evaluate(task, model, task.test) for _, model, _ in runs]
    result = {
        "lr": lr, "mixer_lr_multiplier": multiplier,
        "sweep": {f"lr={c[0]:g} mixer_x{c[1]}": final_val_loss(c) for c in sweep},
        "curves": [curve for curve, _, _ in runs],
        "val_loss": [curve[-1][1] for curve, _, _ in runs],
        "test": {name: [t[name] for t in tests] for name in tests[0]},
        "step_s": [t for _, _, t in runs],
        "trainable": moslora_ext.trainable_parameters(runs[0][1])[0],
    }
    log(f"{task.name} r={rank} {method}: test loss per seed {[round(v, 4) for v in result['test']['loss']]}")
    return result


def run_task(task, args, log):
    """The whole study on one task: every method at RANK, then LoRA and the best variant at the other ranks."""
    schedule = task.quick_schedule if args.quick else task.schedule
    schedule = dataclasses.replace(schedule, **{f.name: getattr(args, f.name) for f in dataclasses.fields(Schedule)
                                                if getattr(args, f.name) is not None})
    pretrained = pretrained_model(task, schedule, args, log)
    torch.manual_seed(0)
    before = evaluate(task, task.for_adaptation(pretrained), task.test)
    runs = {RANK: {m: study(task, pretrained, m, RANK, schedule, args, log) for m in args.methods}}
    variants = [m for m in args.methods if trains_mixer(m)]
    best = min(variants, key=lambda m: statistics.mean(runs[RANK][m]["val_loss"])) if variants else None
    for rank in args.other_ranks:
        runs[rank] = {m: study(task, pretrained, m, rank, schedule, args, log) for m in ["lora", best] if m}
    return {"schedule": dataclasses.asdict(schedule), "before_adaptation": before, "best_variant": best,
            "summary": {str(rank): summarise(results) for rank, results in runs.items()},
            "runs": {str(rank): results for rank, results in runs.items()}}


# --- statistics and reporting -------------------------------------------------------------------


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


def summarise(results):
    """Per method: its settings, mean and sd of each test metric, step time relative to LoRA, p against LoRA."""
    rows = {}
    lora_time = statistics.median(results["lora"]["step_s"])
    for method, r in results.items():
        row = {"lr": r["lr"], "mixer_lr_multiplier": r["mixer_lr_multiplier"], "seeds": len(r["test"]["loss"])}
        for name, values in r["test"].items():
            row[f"{name}_mean"] = statistics.mean(values)
            row[f"{name}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row["step_time_vs_lora"] = statistics.median(r["step_s"]) / lora_time
        row["trainable_parameters"] = r["trainable"]
        if method != "lora":
            row["mann_whitney_u_vs_lora"], row["p_vs_lora"] = mann_whitney_u(r["test"]["loss"],
                                                                             results["lora"]["test"]["loss"])
        rows[method] = row
    return rows


def format_table(name, report):
    """The task's tables, one per rank."""
    before = ", ".join(f"{metric} {value:.4f}" for metric, value in report["before_adaptation"].items())
    lines = [f"{name}: before adaptation, test {before}"]
    metrics = list(report["before_adaptation"])
    for rank, rows in report["summary"].items():
        header = (f"{'r=' + rank:<26}{'lr':>7}{'mixer lr':>9}{'seeds':>6}"
                  + "".join(f"{m:>22}" for m in metrics) + f"{'step/lora':>11}{'trainable':>11}{'p vs lora':>11}")
        lines += ["", header, "-" * len(header)]
        for method, row in rows.items():
            p = row.get("p_vs_lora")
            lines.append(
                f"{method:<26}{row['lr']:>7.0e}{'x' + str(row['mixer_lr_multiplier']):>9}{row['seeds']:>6}"
                + "".join(f"{row[m + '_mean']:>14.4f} ± {row[m + '_sd']:.4f}" for m in metrics)
                + f"{row['step_time_vs_lora']:>11.2f}{row['trainable_parameters']:>11,}"
                + f"{'-' if p is None else format(p, '.3f'):>11}")
    return "\n".join(lines)


def plot(reports, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def colour(method):  # the same colour for a method in every panel
        return f"C{list(METHODS).index(method)}"

    fig, axes = plt.subplots(len(reports), 3, figsize=(19, 4.8 * len(reports)), squeeze=False)
    for (curves, finals, by_rank), (name, report) in zip(axes, reports.items()):
        results = report["runs"][str(RANK)]
        for i, (method, r) in enumerate(results.items()):
            steps = [s for s, _ in r["curves"][0]]
            values = torch.tensor([[v for _, v in curve] for curve in r["curves"]])
            mean = values.mean(0)
            sd = values.std(0) if len(values) > 1 else torch.zeros_like(mean)
            curves.plot(steps, mean, label=method, color=colour(method))
            curves.fill_between(steps, mean - sd, mean + sd, alpha=0.2, color=colour(method))
            finals.scatter([i] * len(r["test"]["loss"]), r["test"]["loss"], color=colour(method))
        curves.set(xlabel="step", ylabel="validation loss", title=f"{name}: adaptation at r={RANK} (mean ± sd)")
        curves.legend(fontsize=8)
        finals.set_xticks(range(len(results)), list(results), rotation=25, fontsize=8)
        finals.set(ylabel="test loss", title=f"{name}: final test loss at r={RANK}, one point per seed")
        ranks = sorted(int(rank) for rank in report["runs"])
        for method in filter(None, ["lora", report["best_variant"]]):
            losses = [report["runs"][str(rank)][method]["test"]["loss"] for rank in ranks]
            by_rank.errorbar(ranks, [statistics.mean(v) for v in losses], capsize=4, marker="o", label=method,
                             yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in losses], color=colour(method))
        by_rank.set(xscale="log", xlabel="rank r", ylabel="test loss", title=f"{name}: test loss against rank")
        by_rank.set_xticks(ranks, [str(rank) for rank in ranks])
        by_rank.set_xticks([], minor=True)
        by_rank.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"no sweeps (default learning rates, mixer lr x1), 3 seeds, fewer steps, "
                             f"r={OTHER_RANKS[0]} as the only other rank")
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                        help="lora is always included: everything is compared with it")
    parser.add_argument("--other-ranks", nargs="*", type=int,
                        help=f"ranks besides r={RANK} for LoRA and the best MoSLoRA variant (default {OTHER_RANKS})")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--no-sweep", action="store_true", help="use the default learning rates, mixer lr x1")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (results are deterministic for a given count)")
    for field in dataclasses.fields(Schedule):  # each overrides every task's own schedule
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=int)
    parser.add_argument("--out", default="benchmark-results")
    args = parser.parse_args(argv)
    args.methods = ["lora"] + [m for m in args.methods if m != "lora"]
    if args.other_ranks is None:
        args.other_ranks = OTHER_RANKS[:1] if args.quick else OTHER_RANKS
    if args.quick:
        args.seeds, args.no_sweep = min(args.seeds, 3), True
    return args


def main(argv=None):
    args = parse_args(argv)
    start = time.perf_counter()

    def log(message):
        print(f"[{time.perf_counter() - start:6.0f} s] {message}", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        reports = {name: run_task(TASKS[name](), args, log) for name in args.tasks}
    finally:
        torch.set_num_threads(threads)
    for name, report in reports.items():
        print(format_table(name, report) + "\n")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump({"args": vars(args), "torch": torch.__version__, "seconds": time.perf_counter() - start,
                   "tasks": reports}, f, indent=1)
    log(f"wrote {args.out}/quality.json")
    try:
        plot(reports, os.path.join(args.out, "quality.png"))
        log(f"wrote {args.out}/quality.png")
    except ImportError:
        log("matplotlib is not installed: no plot")
    return reports


if __name__ == "__main__":
    main()
