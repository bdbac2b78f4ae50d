"""A small character-level language model on the Python standard library's own sources, where
seeds act as depth growth: the host is a stack of attention-only blocks, and after each block's
attention a seed watches the whole residual stream. Its blueprint is a feed-forward block
`x + W2 gelu(W1 x + b1) + b2` (hidden 4 x d_model, the catalog's residual_mlp kind), identity
while dormant, as LLaMA Pro and MIDAS grow depth.

kasmina seeds wrap linear layers, so each seed site is a frozen identity `nn.Linear(d, d)` (a
tap on the residual stream, in every method, so every method pays its d^2 FLOPs per token); one
seed covers its 64 features (one chunk). An "epoch" is `interval` training steps; the metric is
the held-out loss (nats per character, lower is better), and compute-to-target is measured in
steps to reach static-final's loss.

Text: the interpreter's top-level stdlib `*.py` files in sorted order; characters outside
printable ASCII map to one symbol. The report records the Python version, as the text is that
interpreter's."""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from kasmina import BlueprintSpec, register_blueprint
from torch import nn

VOCAB = 97  # printable ASCII 32..126, newline, tab, one "other" symbol
FFN = register_blueprint(BlueprintSpec("charlm_ffn", "residual_mlp", 101, hidden=256))


def encode(text: str) -> torch.Tensor:
    def code(ch: str) -> int:
        o = ord(ch)
        return o - 32 if 32 <= o < 127 else {"\n": 95, "\t": 96}.get(ch, 0)
    return torch.tensor([code(c) for c in text], dtype=torch.long)


def stdlib_text(chars: int) -> str:
    # EFFICACY_STDLIB: another interpreter's stdlib folder (a copy of it), for the same text
    # on a machine whose Python is another version.
    root = os.environ.get("EFFICACY_STDLIB") or sysconfig.get_paths()["stdlib"]
    parts, n = [], 0
    for name in sorted(f for f in os.listdir(root) if f.endswith(".py")):
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as fh:
            parts.append(fh.read())
        n += len(parts[-1])
        if n >= chars:
            break
    return "".join(parts)[:chars]


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.tap = nn.Linear(d, d)  # the seed site: a frozen identity on the residual stream
        with torch.no_grad():
            self.tap.weight.copy_(torch.eye(d))
            self.tap.bias.zero_()
        self.tap.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape  # (B, T, D)
        q, k, v = self.qkv(self.ln(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B, H, T, Dh)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return self.tap(x)


class CharLM(nn.Module):
    def __init__(self, d: int, heads: int, blocks: int, ctx: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.zeros(ctx, d))
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx) + self.pos[: idx.shape[1]]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))  # (B, T, V)


@dataclass(frozen=True)
class CharLMTask:
    name: str = "charlm"
    d: int = 64
    heads: int = 4
    blocks: int = 2
    ctx: int = 64
    batch_size: int = 32
    # Training steps per "epoch" (one controller boundary): 10, so that the lifecycle's
    # epoch-counted stages (at least 11 boundaries from germination to FOSSILIZED, plus a
    # 150-step ramp for the candidate) fit in the 800 steps; at 25 steps per boundary (a first
    # run) no seed fossilized in any method but the fixed schedule.
    interval: int = 10
    epochs: int = 80
    lr: float = 3e-3
    weight_decay: float = 0.01
    train_chars: int = 400_000
    eval_seqs: int = 128
    seed_sites: tuple[str, ...] = ("blocks.0.tap", "blocks.1.tap")
    seeds_per_layer: int = 1  # one seed over the whole residual stream of a block
    blueprint: str = FFN.name
    direction: str = "min"
    metric_name: str = "held-out loss (nats/char)"

    def load(self) -> dict[str, torch.Tensor]:
        n_eval = self.eval_seqs * self.ctx + 1
        data = encode(stdlib_text(self.train_chars + 2 * n_eval))
        train, rest = data[: self.train_chars], data[self.train_chars:]
        out = {"train": train}
        for k, name in enumerate(("va", "te")):
            chunk = rest[k * n_eval:(k + 1) * n_eval]
            starts = torch.arange(self.eval_seqs) * self.ctx
            out[f"x_{name}"] = torch.stack([chunk[s:s + self.ctx] for s in starts])
            out[f"y_{name}"] = torch.stack([chunk[s + 1:s + 1 + self.ctx] for s in starts])
        return out

    def build(self, seed: int, scale: float = 1.0) -> nn.Module:
        torch.manual_seed(seed)
        d = max(self.heads, round(self.d * scale / self.heads) * self.heads)
        return CharLM(d, self.heads, self.blocks, self.ctx)

    def batches(self, data: dict[str, torch.Tensor], gen: torch.Generator
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train = data["train"]
        for _ in range(self.interval):
            s = torch.randint(0, len(train) - self.ctx - 1, (self.batch_size,), generator=gen)
            x = torch.stack([train[i:i + self.ctx] for i in s.tolist()])
            y = torch.stack([train[i + 1:i + 1 + self.ctx] for i in s.tolist()])
            yield x, y

    def samples_per_epoch(self, data: dict[str, torch.Tensor]) -> int:
        return self.interval * self.batch_size

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def val_loss(self, model: nn.Module, data: dict[str, torch.Tensor]) -> float:
        model.eval()
        return self.loss(model, data["x_va"], data["y_va"]).item()

    def val_samples(self, data: dict[str, torch.Tensor]) -> int:
        return self.eval_seqs

    @torch.no_grad()
    def metric(self, model: nn.Module, data: dict[str, torch.Tensor]) -> float:
        model.eval()
        return self.loss(model, data["x_te"], data["y_te"]).item()

    def forward_flops(self, matmul_params: int) -> float:
        """Per sequence: 2 per linear weight per token, plus the attention scores and the
        weighted sum (2 * 2 * T * d per token per block, causal half not subtracted)."""
        d_attn = self.d  # attention width of the host (the plain model's is wider: ignored)
        return self.ctx * (2.0 * matmul_params + 4.0 * self.ctx * d_attn * self.blocks)


CHARLM = CharLMTask()
assert math.isclose(FFN.param_count(64), 64 * 256 * 2 + 256 + 64)
