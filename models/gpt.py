"""nanoGPT-style decoder-only transformer (after karpathy/nanoGPT, model.py).

Pre-norm blocks, learned positional embeddings, causal SDPA attention, GELU MLP,
token-embedding / lm_head weight tying and GPT-2 initialisation. Pure PyTorch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from models.config import MODEL_BLOCK_SIZES

FUSED_DEVICES = ("cpu", "cuda")  # where torch has a fused AdamW kernel (configure_optimizer)


@dataclass(frozen=True)
class GPTConfig:
    block_size: int  # max context length T
    vocab_size: int = 256  # ByteTokenizer: one token per UTF-8 byte
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = False  # biases in Linear/LayerNorm; False: a bit better and faster

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            msg = f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            raise ValueError(msg)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


MODEL_SIZES: dict[str, GPTConfig] = {
    # tests: trains in milliseconds
    "tiny": GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=MODEL_BLOCK_SIZES["tiny"]),
    # the CPU demo
    "small": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=MODEL_BLOCK_SIZES["small"]),
    # ~127M params (GPT-2 small width, 18 layers), for GPU
    "base": GPTConfig(n_layer=18, n_head=12, n_embd=768, block_size=MODEL_BLOCK_SIZES["base"]),
    # ~353M params (GPT-2 medium width, 28 layers): 2 centres x 2 rounds fit a 2-core, 24 GB machine
    "large": GPTConfig(n_layer=28, n_head=16, n_embd=1024, block_size=MODEL_BLOCK_SIZES["large"]),
    # ~1.0B params (20 layers x 2048): for GPUs
    "xl": GPTConfig(n_layer=20, n_head=16, n_embd=2048, block_size=MODEL_BLOCK_SIZES["xl"]),
}


def model_config(name: str) -> GPTConfig:
    """Look up a named size in :data:`MODEL_SIZES`."""
    try:
        return MODEL_SIZES[name]
    except KeyError:
        names = ", ".join(MODEL_SIZES)
        raise ValueError(f"unknown model {name!r}; choose one of: {names}") from None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.c_attn = nn.Linear(C, 3 * C, bias=config.bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(C, C, bias=config.bias)  # residual projection
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()  # batch, sequence length, n_embd
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # each (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        p = self.dropout if self.training else 0.0  # attention dropout: training only
        # flash / memory-efficient kernel where available
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        C = config.n_embd
        self.c_fc = nn.Linear(C, 4 * C, bias=config.bias)  # 4x hidden, as in GPT-2
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * C, C, bias=config.bias)  # residual projection
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))  # pre-norm: the residual stream stays raw
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        C = config.n_embd
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, C),  # token embeddings
                "wpe": nn.Embedding(config.block_size, C),  # learned positions
                "drop": nn.Dropout(config.dropout),
                "h": nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                "ln_f": nn.LayerNorm(C, bias=config.bias),
            }
        )
        self.lm_head = nn.Linear(C, config.vocab_size, bias=False)
        # weight tying (Press & Wolf 2017): wte and lm_head share one Parameter
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        # GPT-2 paper: scale residual projections by 1/sqrt(N), N = 2 adds per layer
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * config.n_layer)
                nn.init.normal_(p, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx, targets: (B, T) int64. Returns logits (B, T, V), mean CE loss or None."""
        _, T = idx.size()  # (B, T)
        if T > self.config.block_size:
            msg = f"sequence length {T} exceeds block_size {self.config.block_size}"
            raise ValueError(msg)
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)  # (B, T, C)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            flat = logits.view(-1, logits.size(-1))  # (B*T, V)
            loss = F.cross_entropy(flat, targets.reshape(-1))  # mean over B*T
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; tied wte/lm_head counted once (parameters() de-duplicates).

        non_embedding subtracts the position embeddings; token embeddings stay in
        because they double as the lm_head weights (same convention as nanoGPT).
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token at full context.

        PaLM paper (Chowdhery et al. 2022), Appendix B: 6N for the matmuls with the
        weights plus 12 * L * H * Q * T = 12 * n_layer * n_embd * block_size for the
        attention scores and values (H * Q = n_embd). Same as nanoGPT's estimate_mfu.
        """
        cfg = self.config
        n = self.num_params(non_embedding=True)
        return float(6 * n + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size)

    def configure_optimizer(
        self, lr: float, weight_decay: float, betas: tuple[float, float]
    ) -> torch.optim.AdamW:
        """AdamW; weight decay on >=2-D params (matmul weights, embeddings) only,
        none on biases and LayerNorm gains (1-D)."""
        params = [p for p in self.parameters() if p.requires_grad]  # tied: once
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # Fused: one kernel over each parameter and its moments. The default for-loop AdamW makes
        # parameter-sized temporaries in every step, which the workers' fixed mmap threshold
        # (models/memory.py) hands back to the OS and faults in again. base's 1x64 step on one idle
        # core: 3.75 s so, 1.98 s fused (2.56 s and 1.78 s without the threshold).
        fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


def build_model(name: str, seed: int) -> GPT:
    """Construct a named model whose initial weights are fully determined by ``seed``.

    The global CPU RNG state is forked and restored, so callers' randomness is
    unaffected. Initialisation runs on the CPU; move the model afterwards.
    """
    config = model_config(name)
    with torch.random.fork_rng(devices=[]):  # CPU RNG only: init happens on CPU
        torch.manual_seed(seed)
        return GPT(config)


def parameter_manifest(model: nn.Module) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every state_dict key -> (shape, dtype name such as "float32").

    With weight tying both ``transformer.wte.weight`` and ``lm_head.weight`` appear,
    matching state_dict semantics so load_state_dict round-trips.
    """
    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in model.state_dict().items()
    }
