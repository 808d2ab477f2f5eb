"""
mdlm.py: a Masked Diffusion Language Model, from scratch, in one file.

A GPT writes text left to right, one character per forward pass. A masked diffusion LM starts from
a line of [MASK] and, over as many passes as one asks, replaces masks with characters anywhere in
the line, each pass seeing the whole line both ways. Training is BERT's masked-token prediction
with the fraction masked drawn fresh for every sequence, from 0 to 1, and the losses weighted so
that their sum bounds the negative log-likelihood (MDLM, Sahoo et al. 2024; LLaDA, Nie et al. 2025).

Sections 1-9 are the lesson, each a `# %%` cell (a notebook runs their `if NOTEBOOK:` demos);
nothing in them uses the harness below the marked line. python mdlm.py --train, then --sample,
--complete "ROMEO:", --infill "To [___] or not to [___]", --eval; --help says the rest.
"""

import contextlib
import math
import os
import re
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


# %% 1. Config -------------------------------------------------------------------------------------
# The numbers a reader tunes, each with the section that explains it. Losses are in nats per
# character (natural log; divide by log 2 = 0.693 for bits per character).

@dataclass
class ModelConfig:           # section 4
    vocab_size: int = 66     # the 65 characters of Tiny Shakespeare, and one more id that marks a hidden one
    block_size: int = 256    # the context: the longest line of characters the model reads at once
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    use_time: bool = True    # tell the model how much of its input is hidden (section 4)
    causal: bool = False     # True: the same network reading left to right only, a GPT (section 4)

# 'base' is shaped like nanoGPT's character-level Shakespeare GPT, for a GPU; 'tiny' for a CPU. Every
# eval_interval steps a run scores held-out text on eval_iters batches (section 9).
PRESETS = {
    'base': dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, use_time=True,
                 batch_size=64, max_iters=5000, lr=1e-3, eval_interval=250, eval_iters=50),
    'tiny': dict(n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0, use_time=True,
                 batch_size=32, max_iters=5000, lr=3e-3, eval_interval=500, eval_iters=20),
}
# Shared by the presets: the learning-rate schedule (warm up, hold, decay) and the optimizer, Muon (section
# 6); the rule that draws how many characters training hides, and the loss, a likelihood bound (section 5).
RECIPE = dict(min_lr=1e-4, warmup_iters=100, decay_frac=0.5, weight_decay=0.1, optimizer='muon',
              t_proposal='cosine', loss='nelbo')

@dataclass
class SamplerConfig:             # how text is written (section 7)
    rule: str = 'confidence'     # which hidden characters a step fills: 'confidence', 'ancestral' or 'random'
    steps: int = 8               # steps to fill a block
    semi_ar: int = 8             # blocks of this many hidden characters, left to right (0: one block)
    temperature: float = 1.0     # 0: always the likeliest character
    top_p: float = 1.0           # draw only among the likeliest characters whose probabilities sum to top_p

INFILL_TEMPERATURE = 0.0   # one fill of a blank (section 8) is the best guess; several are drawn at 1
SEED = 1337                # training's batches and noise, and sampling, unless --seed says otherwise
EVAL_SEED = 1234           # every evaluation scores the same text the same way (section 9)
MASK_GLYPH = '■'           # how a hidden character is drawn on screen
DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)) if '__file__' in globals()
                            else os.getcwd(), 'input.txt')   # in a notebook (no __file__): the working folder
NOTEBOOK = __name__ == '__main__' and 'ipykernel' in sys.modules   # the demos run in a notebook only
DEMO_ITERS = 1000          # training steps of the notebook's demo (section 6)

class CliError(Exception):
    """Bad input (an unknown character, a text with no blank): the command line says it in one line."""

# %% 2. Data ---------------------------------------------------------------------------------------
# Tiny Shakespeare, a character tokenizer, and one extra id, [MASK], that stands for a hidden character
# (V = vocab_size ids in all). x0 is a batch of clean text, (B, T): B windows of T characters. A GPT's
# target is its input shifted by one; here the target is x0 itself, and the input x0 with holes.

class Tokenizer:
    """Characters <-> ids: the sorted characters of the text, then [MASK] as the last id, V - 1."""
    def __init__(self, chars):
        self.itos = list(chars)                     # id -> char; [MASK] is not in here
        self.stoi = {c: i for i, c in enumerate(self.itos)}
        self.mask_id = len(self.itos)
        self.vocab_size = len(self.itos) + 1        # + [MASK]

    def encode(self, s):
        unknown = sorted(set(c for c in s if c not in self.stoi))
        if unknown:   # a silent fallback to some id would corrupt the input; refuse instead
            raise CliError(f'characters not in the vocabulary: {" ".join(repr(c) for c in unknown)}')
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return ''.join(MASK_GLYPH if i == self.mask_id else self.itos[i] for i in ids)

def split_data(text, tok, block_size):
    """First 90% for training, last 10% held out for the likelihood, as nanoGPT does."""
    data = torch.tensor(tok.encode(text), dtype=torch.long)
    n = int(0.9 * len(data))
    if len(data) - n < block_size + 1:
        raise CliError(f'{len(data)} characters are too few for block_size {block_size}: a split needs {block_size+1}')
    return data[:n], data[n:]

def get_batch(data, batch_size, block_size, generator):
    """(B, T) windows of clean text, x0, at random offsets."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator, device=data.device)
    return data[ix[:, None] + torch.arange(block_size, device=data.device)]   # (B, T)

if NOTEBOOK:   # demo: the text (input.txt, beside this file), its vocabulary, the two splits
    text = open(DEFAULT_DATA, encoding='utf-8').read()
    tok = Tokenizer(sorted(set(text)))
    train_data, val_data = split_data(text, tok, PRESETS['tiny']['block_size'])
    print(f'{len(text):,} characters, {tok.vocab_size} tokens (65 characters + [MASK]), {len(train_data):,} '
          f'for training, {len(val_data):,} held out; the first 64: {tok.decode(train_data[:64].tolist())!r}')

# %% 3. The forward process ------------------------------------------------------------------------
# Text is destroyed a little at a time. At noise level t in [0, 1], of a window of L characters
# (L = T) exactly k = round(tL) are replaced by [MASK], a uniformly random set of them: the result is
# xt. t = 0 is the text, t = 1 a row of masks; each character is hidden with probability tL/L = t, so
# alpha_t = 1 - t, the chance it is still clean, falls linearly. (MDLM flips a coin of chance t for
# each character; given how many came up, that is this process, and section 5 shows why only the count
# matters.) [MASK] absorbs: with the same random numbers, a larger t hides more, never fewer. Undoing
# this is the whole task: say what was under each mask.

def forward_mask(x0, t, mask_id, generator=None):
    """x0: (B, T) clean ids; t: (B,) noise levels. Returns xt (B, T) and the mask (B, T): in row b the
    round(t_b T) positions with the smallest random numbers u, a uniformly random set of that size."""
    u = torch.rand(x0.shape, generator=generator, device=x0.device)
    mask = u.argsort(1).argsort(1) < (t * x0.size(1)).round()[:, None]   # each position's rank by u, 0 first
    return x0.masked_fill(mask, mask_id), mask

def show_noise(text, tok, seed=0):
    """One line at t = 0, 0.25, 0.5, 0.75, 1, the same random numbers each time, so the masks only grow."""
    x0, lines = torch.tensor([tok.encode(text)]), []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        xt, _ = forward_mask(x0, torch.tensor([t]), tok.mask_id, torch.Generator().manual_seed(seed))
        lines.append(f't={t:.2f}  {tok.decode(xt[0].tolist())}')
    return '\n'.join(lines)

if NOTEBOOK:   # demo: one line of the play, destroyed a little more at each t
    print(show_noise('First Citizen: Before we proceed any further, hear me speak.', tok))

# %% 4. The model ----------------------------------------------------------------------------------
# A transformer that reads xt and predicts x0 at every position: a GPT, block for block, except
#   1) no causal mask: every position attends to every other, in both directions;
#   2) it may be told the noise level t (use_time), through adaLN (below);
#   3) it never predicts [MASK], which clean text never holds: that logit is -inf. MDLM calls this SUBS,
#      with a second rule: a character the input shows is kept as it is (the loss and sampler do that);
#   4) QK-norm (ViT-22B, OLMo 2): each head scales its queries to a root mean square of 2 and its keys
#      to 1, so no attention score exceeds 2 sqrt(hs) however large the weights grow.
# The GPT twin, the yardstick of sections 5 and 9, is this network with causal=True and no t: it
# predicts the next character. Shapes: C = n_embd channels, nh = n_head heads of hs = C / nh each.
# Positions are rotary (RoPE, as in LLaMA and MDLM): each query and key is turned by an angle
# proportional to its position, so a score depends on how far apart two characters are.

def apply_rope(x, cos, sin):
    """Rotate each pair of channels (j, j + hs/2) of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

def attention(q, k, v, causal, dropout=0.0):
    """softmax(q k^T / sqrt(hs)) v, (B, nh, T, hs). A GPT fills the upper triangle of `att` with
    -inf, so position i sees only positions <= i; a diffusion LM does not."""
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))   # (B, nh, T, T)
    if causal:                                                 # GPT twin: no looking right
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float('-inf'))
    return F.dropout(att.softmax(dim=-1), dropout) @ v

class SelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.dropout, self.causal = config.n_head, config.dropout, config.causal
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x, rope):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k = 2 * F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))   # QK-norm (4 above)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)        # q, k, v: (B, nh, T, hs)
        p = self.dropout if self.training else 0.0
        if q.is_cuda or not torch.is_autocast_enabled('cpu'):   # PyTorch's fused kernel: the same values
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=self.causal)   # GPT twin: causal
        else:                                                   # a CPU under bfloat16 autocast: the formula
            y = attention(q, k, v, self.causal, p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

# adaLN, "adaptive LayerNorm" (DiT, the diffusion transformer): each block turns t's embedding
# into a shift and a scale of its LayerNorms' outputs, h = LN(x) * (1 + scale(t)) + shift(t),
# from a layer that starts at zero (as DiT's adaLN-Zero does): at step 0, t changes nothing.
# Is t needed? The input holds exactly tL masks: the model could count them (RADD, Ou et al. 2024).

TIME_DIM = 128   # width of the time embedding that feeds every block's adaLN

class Block(nn.Module):
    """A pre-LayerNorm transformer block, with adaLN when the model uses t."""
    def __init__(self, config):
        super().__init__()
        C = config.n_embd
        self.ln1 = nn.LayerNorm(C)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(C)
        self.mlp = nn.Sequential(nn.Linear(C, 4 * C, bias=False), nn.GELU(approximate='tanh'),
                                 nn.Linear(4 * C, C, bias=False))   # GPT-2's GELU
        self.drop = nn.Dropout(config.dropout)
        self.ada = nn.Linear(TIME_DIM, 4 * C) if config.use_time else None

    def forward(self, x, cond, rope):
        h1 = self.ln1(x)                                                   # (B, T, C)
        if self.ada is not None:               # cond: (B, TIME_DIM) -> 4 x (B, 1, C)
            shift1, scale1, shift2, scale2 = self.ada(cond)[:, None, :].chunk(4, dim=-1)
            h1 = h1 * (1 + scale1) + shift1
        x = x + self.drop(self.attn(h1, rope))
        h2 = self.ln2(x)
        if self.ada is not None:
            h2 = h2 * (1 + scale2) + shift2
        return x + self.drop(self.mlp(h2))

class MDLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert not (config.causal and config.use_time), 'the GPT twin has no time input: use_time=False'
        self.config = config
        C = config.n_embd
        self.tok_emb = nn.Embedding(config.vocab_size, C)
        self.time_mlp = nn.Sequential(nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU(),
                                      nn.Linear(TIME_DIM, TIME_DIM), nn.SiLU()) if config.use_time else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(C)
        self.head = nn.Linear(C, config.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight    # weight tying: reading and writing a char share a vector
        hs = C // config.n_head                   # RoPE: one angle per pair of channels and position
        angles = torch.outer(torch.arange(config.block_size).float(), 10000.0 ** (-torch.arange(0, hs, 2).float() / hs))
        self.register_buffer('rope_cos', angles.cos(), persistent=False)   # (T, hs/2); not saved: derived
        self.register_buffer('rope_sin', angles.sin(), persistent=False)
        # init as GPT-2: N(0, 0.02), residual projections scaled down by depth; adaLN at zero
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith(('proj.weight', 'mlp.2.weight')) else 0.02
                nn.init.normal_(p, std=std)
            if name.endswith('.bias') or '.ada.' in name:
                nn.init.zeros_(p)

    def time_embedding(self, t):
        """Sinusoids of t (B,) at geometric frequencies, then an MLP: (B, TIME_DIM)."""
        half = TIME_DIM // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
        angles = 1000.0 * t.float()[:, None] * freqs[None, :]   # t in [0, 1] scaled as a position would be
        return self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1))

    def forward(self, xt, t):
        """xt: (B, T) ids with [MASK]s; t: (B,) noise levels (None for the GPT). Returns logits (B, T, V)."""
        T = xt.size(1)
        x = self.drop(self.tok_emb(xt))                                            # (B, T, C)
        rope = (self.rope_cos[:T], self.rope_sin[:T])
        cond = self.time_embedding(t) if self.time_mlp is not None else None      # (B, TIME_DIM); GPT twin: none
        for block in self.blocks:
            x = block(x, cond, rope)
        logits = self.head(self.ln_f(x))                                           # (B, T, V)
        # SUBS: [MASK] is never an answer, so an untrained model's loss is log 65, not log 66 (section 5)
        return logits.float().index_fill(-1, torch.tensor([self.config.vocab_size - 1], device=xt.device),
                                         float('-inf'))

    def num_params(self):
        return sum(p.numel() for p in self.parameters())   # tied weights are counted once

if NOTEBOOK:   # demo: the tiny preset's model, untrained
    torch.manual_seed(SEED)
    config = ModelConfig(tok.vocab_size, **{k: v for k, v in PRESETS['tiny'].items() if hasattr(ModelConfig, k)})
    model = MDLM(config)
    print(f'{model.num_params() / 1e6:.2f}M parameters, {config}')

# %% 5. The loss -----------------------------------------------------------------------------------
# What should the model pay for its guesses? The intuitive answer: hide a random share of each window
# and average the cross-entropy over all the hidden characters of the batch. That trains a fine
# denoiser, but its number is no likelihood. A small example shows what is.
# Worked by hand: a window of L = 3 characters, "abc". Picture a writer that starts from three masks
# and reveals one character a step in a random order, paying -log p(the true character | what is
# visible) each time. In the order c, a, b it pays
#     k = 3 hidden: -log p(c | ■■■),   k = 2 hidden: -log p(a | ■■c),   k = 1 hidden: -log p(b | a■c),
# which sum to -log of that order's probability of "abc". Now average over all 3! = 6 orders. At k = 2
# the hidden pair is {a, b} in 2 orders, {a, c} in 2, {b, c} in 2, and in each pair's 2 orders either
# one is revealed next once: every k-subset equally often, every member of it equally often. So the step
# with k hidden costs on average (1/k) * sum over the k hidden i of -log p(x_i | xt), the mean over the
# hidden ones. Add the steps k = L, ..., 1 and divide by L: per character,
#     NELBO = E over k ~ U{1..L} and a uniform k-subset hidden [ (1/k) * sum over the k hidden i of -log p(x_i | xt) ].
# It bounds the likelihood: read the model as this writer with a random order (section 7's sampler
# revealing one character a step), so p(x) is the average over orders of each order's probability (a
# proper one: no mass on [MASK]), and -log of an average is at most the average of -log (Jensen):
# NELBO >= -log p(x) / L. The name: p(x) is the "evidence", and -NELBO a lower bound on log p(x) (ELBO).
# This any-order view is ARDM's (Hoogeboom et al. 2022) and RADD's (Ou et al. 2024).
# The intuitive loss pools instead: a window with k hidden counts k times, so heavily masked windows
# weigh most, where the NELBO takes each window's mean and weighs every k alike.
# So training draws k in 1..L, hides exactly k characters (forward_mask), tells the model t = k / L and
# pays the NELBO. MDLM draws t ~ U(0, 1), hides each character with chance t and divides by tL; given
# k hidden, the Beta integral (1/t) C(L,k) t^k (1-t)^(L-k) over t in [0, 1] is C(L,k) (k-1)! (L-k)! / L!
# = 1/k, so for a model that ignores t the two agree (MDLM eq. 10). MDLM is BERT with a random number
# of masks and a 1/k weight: that is the whole trick.

def masked_ce(logits, x0, mask):
    """Cross-entropy at the masked positions only: (B, T) with zeros elsewhere."""
    return F.cross_entropy(logits.transpose(1, 2), x0, reduction='none') * mask

def nelbo_loss(logits, x0, mask, t, weight=None):
    """The training loss: the NELBO above, averaged over the batch, in nats per character.
    t = k / L; weight (B,): each row's importance weight when k was not drawn uniformly (see draw_t)."""
    per_seq = masked_ce(logits, x0, mask).sum(1) / (t * x0.size(1))   # (B,)
    return (per_seq if weight is None else per_seq * weight).mean()

# Which k to draw. Stratified: one u ~ U(0, 1) shifted by i / B (mod 1) for row i, k = 1 + floor(uL),
# spreads the batch's k evenly over 1..L, a far steadier loss. A refinement, importance sampling: draw k from
# any distribution q(k) > 0 (the proposal) and weigh each row by (1 / L) / q(k): the same expected loss
# with other noise. The default uses it: 'cosine' maps the same u to t = 1 - cos(pi u / 2), k = ceil(tL):
# small k more often, each weighed less (q(k) = F(k/L) - F((k-1)/L), F(s) = (2 / pi) acos(1 - s)).

def draw_t(batch_size, L, generator, device, proposal='uniform'):
    """t = k / L (B,), k masks of L drawn from `proposal`, and each row's weight 1 / (L q(k)): 1 for uniform k."""
    u = (torch.rand(1, generator=generator, device=device) + torch.arange(batch_size, device=device) / batch_size) % 1
    if proposal == 'uniform':
        return (1 + (u * L).floor()).clamp(max=L) / L, torch.ones(batch_size, device=device)
    k = torch.ceil(L * (1 - torch.cos(math.pi / 2 * u))).clamp(1, L)
    cdf = lambda s: (2 / math.pi) * torch.acos(1 - s)               # P(the cosine t <= s)
    return k / L, 1 / (L * (cdf(k / L) - cdf((k - 1) / L)))

def gpt_input(x0, start_id):
    """GPT twin: its input, [start] + x0[:-1] ([MASK] serves as the start token), so it predicts the same L
    characters, and its mean cross-entropy is their exact negative log-likelihood (NLL) per character."""
    return torch.cat([torch.full_like(x0[:, :1], start_id), x0[:, :-1]], 1)

if NOTEBOOK:   # demo: untrained, the model guesses about uniformly among 65 characters: a loss near log 65
    gen = torch.Generator().manual_seed(SEED)
    x0 = get_batch(train_data, 32, config.block_size, gen)
    t, _ = draw_t(32, config.block_size, gen, 'cpu')
    xt, mask = forward_mask(x0, t, tok.mask_id, gen)
    print(f'NELBO {nelbo_loss(model(xt, t), x0, mask, t).item():.3f}, log 65 = {math.log(65):.3f}')

# %% 6. One training step --------------------------------------------------------------------------
# Draw the batch and its noise, forward, loss, backward, clip, update; the harness's train() loops.

def get_lr(it, lr, min_lr, warmup_iters, max_iters, decay_frac):
    """The lr at step `it`: warmup, stable, then a linear decay to min_lr over the last decay_frac of the steps."""
    if it < warmup_iters:                                        # 1) linear warmup from 0
        return lr * (it + 1) / warmup_iters
    decay_start = max(warmup_iters, (1 - decay_frac) * max_iters)             # 2) stable at lr until here
    frac = min(1.0, max(0.0, (it - decay_start) / max(1, max_iters - decay_start)))
    return lr - frac * (lr - min_lr)                             # 3) linear decay to min_lr

def training_batch(data, batch_size, block_size, mask_id, generator, causal, proposal='uniform'):
    """(x0, xt, mask, t, weight): x0 with k = tL masks, k from `proposal`, or for a GPT x0 shifted (and Nones)."""
    x0 = get_batch(data, batch_size, block_size, generator)
    if causal:                                                     # GPT twin: x0 shifted, nothing hidden
        return x0, gpt_input(x0, mask_id), None, None, None
    t, w = draw_t(batch_size, block_size, generator, data.device, proposal)
    xt, mask = forward_mask(x0, t, mask_id, generator)
    return x0, xt, mask, t, w

def batch_loss(model, x0, xt, mask, t, w, objective='nelbo'):
    """A training_batch's loss: the GPT's NLL, the NELBO, or the pooled masked CE (objective='naive')."""
    logits = model(xt, t)
    if mask is None:                                               # GPT twin: exactly -log p(x0) / L
        return F.cross_entropy(logits.transpose(1, 2), x0)
    if objective == 'naive':     # the intuitive loss, pooled over the batch's masks: every masked char alike
        return masked_ce(logits, x0, mask).sum() / mask.sum().clamp(min=1)
    return nelbo_loss(logits, x0, mask, t, w)

# The update. AdamW scales each weight's step by its own gradient history; Muon (K. Jordan, 2024) steps a
# matrix by the (semi-)orthogonal matrix nearest its Nesterov momentum, moving every direction the matrix
# maps equally, not mostly the few where the gradient is large. Newton-Schulz gets there without an SVD:
# five steps of matmuls, each an odd polynomial (Jordan's coefficients) of every singular value, push them
# all near 1. The scale 0.2 sqrt(max(rows, cols)) gives AdamW's typical step size, so one lr serves both.
# Muon takes the blocks' matrices, AdamW the rest: the embedding (tied to the head), the time input, gains, biases.

def orthogonalize(G, steps=5, dtype=torch.float32):
    """About U V^T for G = U S V^T, each matrix of a stack (..., m, n): Muon's quintic Newton-Schulz, in `dtype`."""
    tall = G.size(-2) > G.size(-1)               # iterate on the wide side: X X^T is the small one
    X = ((G.mT if tall else G) / (G.norm(dim=(-2, -1), keepdim=True) + 1e-7)).to(dtype)   # singular values <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = 3.4445 * X + (-4.7750 * A + 2.0315 * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)

class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr, weight_decay, momentum=0.95, ns_dtype=torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum))
        self.ns_dtype = ns_dtype                 # the iteration's precision: float32, or bfloat16

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group['lr'], group['momentum']
            by_shape = {}                        # one iteration runs on each stack of same-shape matrices
            for p in group['params']:
                if 'momentum_buffer' not in self.state[p]:
                    self.state[p]['momentum_buffer'] = torch.zeros_like(p)
                buf = self.state[p]['momentum_buffer']
                buf.mul_(mu).add_(p.grad)                                        # B = mu B + G
                by_shape.setdefault(p.shape, []).append((p, p.grad + mu * buf))  # Nesterov: G + mu B
            for shape, pairs in by_shape.items():
                for (p, _), o in zip(pairs, orthogonalize(torch.stack([g for _, g in pairs]), dtype=self.ns_dtype)):
                    p.mul_(1 - lr * group['weight_decay']).add_(o, alpha=-lr * 0.2 * math.sqrt(max(shape)))

def make_optimizers(model, lr, weight_decay, kind='muon', ns_dtype=torch.float32, fused=False):
    """[Muon on the blocks' matrices, AdamW on the rest] or [AdamW on all]; decay on matrices only."""
    muon = [p for n, p in model.named_parameters() if kind == 'muon' and n.startswith('blocks.') and
            '.ada.' not in n and p.dim() == 2]
    rest = [p for p in model.parameters() if all(p is not q for q in muon)]
    adamw = torch.optim.AdamW([{'params': [p for p in rest if p.dim() >= 2], 'weight_decay': weight_decay},
                               {'params': [p for p in rest if p.dim() < 2], 'weight_decay': 0.0}],
                              lr=lr, betas=(0.9, 0.99), fused=fused)
    return ([Muon(muon, lr, weight_decay, ns_dtype=ns_dtype)] if muon else []) + [adamw]

def train_step(model, optimizers, batch, lr, objective='nelbo', autocast=contextlib.nullcontext):
    """One step on a training_batch, the forward pass in `autocast`; returns the loss, detached."""
    for group in (g for opt in optimizers for g in opt.param_groups):   # 1) this step's learning rate
        group['lr'] = lr
    with autocast():
        loss = batch_loss(model, *batch, objective)                # 2) forward and loss
    loss.backward()                                                # 3) backward
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)        # 4) clip, update, clear
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return loss.detach()

if NOTEBOOK:   # demo: train the tiny model for DEMO_ITERS steps with the default recipe
    hp = {**RECIPE, **PRESETS['tiny']}
    optimizers = make_optimizers(model, hp['lr'], hp['weight_decay'], hp['optimizer'])
    for it in range(DEMO_ITERS):
        batch = training_batch(train_data, hp['batch_size'], hp['block_size'], tok.mask_id, gen, False,
                               hp['t_proposal'])
        lr = get_lr(it, hp['lr'], hp['min_lr'], hp['warmup_iters'], DEMO_ITERS, hp['decay_frac'])
        loss = train_step(model, optimizers, batch, lr)
        if it % 100 == 0 or it == DEMO_ITERS - 1:
            print(f'step {it} | loss {loss.item():.4f}')
    model.eval()

# %% 7. Sampling -----------------------------------------------------------------------------------
# The reverse process, from t = 1 (all masks) to t = 0 (text) in N steps of t -> s = t - 1/N. A character
# hidden at t was hidden already at s with chance s / t (section 3: the hidden set only grows), so it was
# clean at s with chance (t - s) / t = (alpha_s - alpha_t) / (1 - alpha_t). The step that undoes it is:
#   1) run the model on x: a distribution over characters at every position;
#   2) draw a candidate character for every hidden position from it;
#   3) reveal each candidate with probability (t - s) / t; the other positions stay hidden.
# That is MDLM's ancestral sampler; its last step (s = 0) reveals all. Given characters are never
# touched, so one loop samples, completes (a prompt, then masks) and fills blanks. As in training, the
# model is told t = the fraction of its input still hidden. The rule picks what a step reveals:
#   'ancestral'   the reverse process above, exactly (with semi_ar = 0);
#   'confidence'  the k candidates the model is surest of (MaskGIT, LLaDA; sure: the candidate's probability
#                 after temperature and top_p, where LLaDA takes the plain softmax), k = floor(M / N) a
#                 step, + 1 in the first M mod N steps: M masks take exactly N steps;
#   'random'      k candidates chosen at random: 'confidence' without its choice.
# semi_ar = n (LLaDA's semi-autoregressive blocks): an outer loop hands the steps the first n masks of
# each row, then the next n, each block a whole schedule of N steps; with n = N = 8, the default, one
# character a pass. The GPT twin writes with its own loop, gpt_generate (below the marked line).

@torch.no_grad()
def generate(model, x, sampler=SamplerConfig(), generator=None, on_step=None):
    """Fill every [MASK] of x (B, T); on_step(x) sees each step's result. Returns x."""
    mask_id, N = model.config.vocab_size - 1, sampler.steps
    x = x.clone()
    while (x == mask_id).any():                     # one block: all the masks, or the next semi_ar
        masked = x == mask_id
        block = masked & (masked.cumsum(1) <= sampler.semi_ar) if sampler.semi_ar else masked   # (B, T)
        M = block.sum(1)                                               # (B,) masks in the block
        for i in range(N):                                  # step i: t = 1 - i/N -> s = 1 - (i+1)/N
            todo = block & (x == mask_id)                              # (B, T) masks still open
            if not todo.any():
                break
            logits = model(x, (x == mask_id).float().mean(1))          # told t = fraction masked
            tokens, conf = propose(logits, sampler.temperature, sampler.top_p, generator)
            k = M // N + (i < M % N).long()                            # (B,) to reveal ('confidence', 'random')
            commit = unmask(sampler.rule, todo, conf, 1 - i / N, 1 - (i + 1) / N, k, generator)
            x = torch.where(commit, tokens, x)
            if on_step is not None:
                on_step(x)
    return x

def unmask(rule, masked, conf, t, s, k, generator):
    """Which masks (B, T) to commit on the step from t to s: each with probability (t - s) / t
    ('ancestral'), or the k[b] surest ('confidence') or k[b] random ('random') of row b."""
    if rule == 'ancestral':
        return masked & (torch.rand(masked.shape, generator=generator, device=masked.device) < (t - s) / t)
    score = conf if rule == 'confidence' else torch.rand(masked.shape, generator=generator, device=masked.device)
    rank = score.masked_fill(~masked, float('-inf')).argsort(1, descending=True).argsort(1)   # 0 = best
    return masked & (rank < k[:, None])

def propose(logits, temperature=1.0, top_p=1.0, generator=None):
    """A candidate per position, drawn from softmax(logits / temperature) within the nucleus (the fewest
    characters whose probabilities sum to top_p), and its probability there: the confidence (temperature 0:
    the argmax, scored at temperature 1). Gumbel-max draws it: argmax(logits - log(-log u)), u uniform, lands
    on each token with its softmax probability; in float64, as float32 noise cools samples (Zheng et al. 2024)."""
    logits = logits.float() if logits.device.type == 'mps' else logits.double()   # Apple's mps has no float64
    if temperature > 0:
        logits = logits / temperature
    if top_p < 1:    # drop a token when the tokens surer than it already sum to top_p (the top one stays)
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = (probs.cumsum(-1) - probs) >= top_p                                 # (..., V) sorted
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float('-inf'))
    if temperature > 0:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        tokens = (logits - torch.log(-torch.log(u.clamp(min=1e-300)))).argmax(-1)
    else:
        tokens = logits.argmax(-1)
    conf = logits.softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return tokens, conf

if NOTEBOOK:   # demo: two lines of text out of pure noise, with the default sampler
    out = generate(model, torch.full((2, config.block_size), tok.mask_id), generator=gen)
    print('\n\n'.join(tok.decode(row.tolist()) for row in out))

# %% 8. Completion and infilling -------------------------------------------------------------------
# The same loop with characters given. Completion: the prompt, then masks. Infilling: masks in
# the blanks, text on both sides, which a GPT cannot use (it never sees the right side).

def generate_text(model, prefix, length, num_samples, sampler=SamplerConfig(), generator=None, on_step=None):
    """`length` new characters after `prefix` (ids) in num_samples rows, window by window: the first window
    holds the prompt (up to T - 1 of it), each later one the last half window of text, and masks after it."""
    T, mask_id = model.config.block_size, model.config.vocab_size - 1
    device = next(model.parameters()).device
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)   # (B, P)
    while out.size(1) < len(prefix) + length:
        keep = min(out.size(1), T - 1 if out.size(1) == len(prefix) else T - T // 2)   # text it must see
        n_new = min(len(prefix) + length - out.size(1), T - keep)          # masks to write in this window
        context = out[:, -min(out.size(1), T - n_new):]                      # and all the text that fits

        x = torch.cat([context, torch.full((num_samples, n_new), mask_id, device=device)], 1)
        out = torch.cat([out, generate(model, x, sampler, generator, on_step)[:, -n_new:]], 1)
    return out

def blank_window(p, q, n, T):
    """Start of the T-wide window around the blank [p, q) of a text of n: centred, inside, <= p."""
    return max(0, min((p + q - T) // 2, n - T, p))

def infill(model, ids, num_samples, sampler=SamplerConfig(), generator=None, on_step=None):
    """Fill the [MASK]s of ids (a list) in num_samples rows: (B, L). Blank by blank, each in the
    context-wide window around it (its left and right context, and any other masks in it)."""
    T, mask_id = model.config.block_size, model.config.vocab_size - 1
    x = torch.tensor(ids, device=next(model.parameters()).device).repeat(num_samples, 1)   # (B, L)
    while (x == mask_id).any():
        masked = (x[0] == mask_id).long()                            # the rows are copies: row 0's blanks
        p = masked.argmax().item()                                   # the first mask left ...
        rest = masked[p:]
        q = p + (rest.argmin().item() if (rest == 0).any() else len(rest))   # ... and the end of its blank
        start = blank_window(p, q, len(ids), T)
        x[:, start:start + T] = generate(model, x[:, start:start + T], sampler, generator, on_step)
    return x

if NOTEBOOK:   # demo: continue a prompt; fill a blank from both sides
    print(tok.decode(generate_text(model, tok.encode('ROMEO:\n'), 96, 1, generator=gen)[0].tolist()))
    ids = tok.encode('To be, or not to be, that is the ') + [tok.mask_id] * 8 + tok.encode('.')
    print('\n'.join(tok.decode(row.tolist()) for row in infill(model, ids, 2, generator=gen)))

# %% 9. Evaluation ---------------------------------------------------------------------------------
# An honest likelihood: held-out text, the same windows and masks every time, low variance. The
# estimator is training's (section 5) with uniform k, spread evenly over 1..L across the batch, weighed
# by 1/k (LLaDA's likelihood estimator); the GPT twin's score is its exact NLL. For the default tiny
# model, `python mdlm.py --eval` printed
#   val nelbo: 1.8629 nats/char (2.6875 bits/char) +- 0.0096 (standard error, 100 batches of 32 windows
#   of 64); perplexity <= 6.442 (an upper bound: the NELBO bounds -log p)

@torch.no_grad()
def nelbo_per_seq(model, x0, generator):
    """The NELBO's estimate per window (B,), nats per character: exactly k_b = t_b L of its L positions masked."""
    t, _ = draw_t(*x0.shape, generator, x0.device)
    xt, mask = forward_mask(x0, t, model.config.vocab_size - 1, generator)
    return masked_ce(model(xt, t), x0, mask).sum(1) / mask.sum(1)

@torch.no_grad()
def nll_per_seq(model, x0):
    """GPT twin: its exact negative log-likelihood per window (B,), nats per character."""
    logits = model(gpt_input(x0, model.config.vocab_size - 1), None)
    return F.cross_entropy(logits.transpose(1, 2), x0, reduction='none').mean(1)

# An exact likelihood too: section 5's writer with one order, chosen from the visible input only
# (never the hidden characters), so its probabilities sum to 1 over all strings, as a GPT's do. Left to
# right it is a GPT inside the diffusion model; 'surest' reveals where the model is surest first. The
# NELBO averages random orders: a good order can score below it.

def surest(logp, masked):   # (B,): the masked position whose prediction has the highest top probability
    return logp.amax(-1).masked_fill(~masked, float('-inf')).argmax(1)

@torch.no_grad()
def exact_nll(model, x0, order=None):
    """-log p(x0) / L per window (B,), each pass revealing where order(log-probs, masks) says (None: leftmost)."""
    (B, L), mask_id = x0.shape, model.config.vocab_size - 1
    x, rows, nll = torch.full_like(x0, mask_id), torch.arange(B, device=x0.device), 0
    for k in range(L, 0, -1):                                      # k masks left: told t = k / L
        logp = model(x, torch.full((B,), k / L, device=x0.device)).log_softmax(-1)    # (B, L, V)
        i = order(logp, x == mask_id) if order else (x == mask_id).float().argmax(1)   # (B,)
        nll = nll - logp[rows, i, x0[rows, i]]
        x[rows, i] = x0[rows, i]
    return nll / L

@torch.no_grad()
def estimate_loss(model, data, n_batches, batch_size, seed=EVAL_SEED, per_seq=None):
    """Nats/char and standard error over n_batches seeded batches: the NELBO bound, a GPT's exact
    NLL, or per_seq(model, x0). Windows and masks have generators of their own: every call, any
    kind, scores the same ones. A batch shares one stratified draw: the error is between batches."""
    was_training = model.training
    model.eval()
    windows = torch.Generator(device=data.device).manual_seed(seed)
    noise = torch.Generator(device=data.device).manual_seed(seed + 1)
    means = []
    for _ in range(n_batches):
        x0 = get_batch(data, batch_size, model.config.block_size, windows)
        scores = per_seq(model, x0) if per_seq else nll_per_seq(model, x0) if model.config.causal \
            else nelbo_per_seq(model, x0, noise)
        means.append(scores.float().mean())
    model.train(was_training)
    m = torch.stack(means)
    return m.mean().item(), (m.std() / math.sqrt(len(m))).item() if len(m) > 1 else float('nan')

if NOTEBOOK:   # demo: the trained model's bound on held-out text
    nelbo, se = estimate_loss(model, val_data, 10, 32)
    print(f'val NELBO {nelbo:.3f} +- {se:.3f} nats/char: perplexity <= {math.exp(nelbo):.2f}')
    print(f'exact, left to right: {estimate_loss(model, val_data, 2, 32, per_seq=exact_nll)[0]:.3f} nats/char')

# %% ========================== THE LESSON IS COMPLETE ==========================================
# Everything above is a whole, working MDLM. Below is the harness a reader may skip, with its own imports:
# the data file, device and precision, checkpoints, resume, DDP, the logged training run, the command line.
# ================================================================================================
import argparse
import itertools
import signal
import time
import types
from dataclasses import asdict, fields

EVAL_BATCHES = 100      # --eval averages this many batches; the training log, the first eval_iters of them
EXACT_BATCHES = 20      # --eval --exact: the first 20 of them (block_size passes a window for each order)
GPT_DECAY_FRAC = 0.2    # the GPT twin decays its lr over the last 20% of its steps: over half, it overfits

# %% Harness: data file, device and precision ------------------------------------------------------

def load_text(path):
    """The UTF-8 text at `path`, or one line that says what is wrong with it."""
    try:
        with open(path, encoding='utf-8') as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f'no data file at {path}' if isinstance(e, FileNotFoundError) else f'{path} is not UTF-8 text'
                       if isinstance(e, UnicodeDecodeError) else f'cannot read {path}: {e.strerror}')
    if not text:
        raise CliError(f'{path} is empty')
    return text

def splits(text, tok, block_size, fraction, device):
    """split_data on the device, the training split cut to its first `fraction` (--train-fraction)."""
    train_data, val_data = split_data(text, tok, block_size)
    n = int(fraction * len(train_data))
    if n < block_size + 1:
        raise CliError(f'--train-fraction {fraction:g} leaves {n} characters; a window needs {block_size + 1}')
    return train_data[:n].to(device), val_data.to(device)

def pick_device(requested=None):
    """--device if this machine has it, else the best there is: cuda, then mps, then cpu."""
    if requested:
        try:      # fails on a device this machine does not have, or on what is no device at all
            torch.empty(1, device=requested if requested.split(':')[0] in ('cpu', 'cuda', 'mps') else 'none')
        except (RuntimeError, AssertionError):      # AssertionError: a torch built without CUDA
            raise CliError(f'--device {requested} is not a device of this machine: use cpu, cuda, cuda:N or mps')
        return requested
    return 'cuda' if torch.cuda.is_available() else 'mps' if torch.backends.mps.is_available() else 'cpu'

def cpu_has_bf16():
    """True where the CPU computes bfloat16 natively (x86 avx512_bf16 or AMX); elsewhere it is emulated, slow."""
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:   # not Linux: no claim, float32
        return bool(re.search(r'\b(avx512_bf16|amx_bf16)\b', f.read()))
    return False

def autocast_for(device, dtype='auto'):
    """bf16 autocast where the hardware computes bf16 natively (--dtype auto), else float32: a null context."""
    kind = device.split(':')[0]
    native = torch.cuda.is_bf16_supported() if kind == 'cuda' else kind == 'cpu' and cpu_has_bf16()
    if dtype == 'bfloat16' or dtype == 'auto' and native:
        return lambda: torch.autocast(device_type=kind, dtype=torch.bfloat16)
    return contextlib.nullcontext

# %% Harness: checkpoints, resume, DDP -------------------------------------------------------------

FORMAT = 'mdlm-4'
ARCH_FLAGS = ('n_layer', 'n_head', 'n_embd', 'block_size', 'use_time', 'causal')   # fixed by a checkpoint
TRAIN_FLAGS = ('batch_size', 'max_iters', 'lr', 'eval_interval', 'eval_iters', 'train_fraction', *RECIPE)

def save_checkpoint(path, ckpt):
    """Write path.tmp, fsync, rename it over `path`: a crash leaves the old or the new, never half of one."""
    with open(path + '.tmp', 'wb') as f:
        torch.save(ckpt, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)
    with contextlib.suppress(OSError):   # make the rename itself durable
        d = os.open(os.path.dirname(path) or '.', os.O_RDONLY)
        os.fsync(d)
        os.close(d)

def load_checkpoint(path):
    """Load with weights_only=True: tensors and plain values only, so a hostile file cannot run code."""
    if not os.path.exists(path):
        raise CliError(f'no checkpoint at {path}; train one with: python mdlm.py --train')
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0][:100]
        raise CliError(f'{path} is not a loadable checkpoint ({reason})')
    fmt = ckpt.get('format') if isinstance(ckpt, dict) else None
    if isinstance(fmt, str) and fmt.startswith('mdlm-') and fmt != FORMAT:   # the same weights, another network
        raise CliError(f'{path} was saved by an earlier mdlm.py ({fmt}; this one reads {FORMAT}): train it again')
    keys = {'model', 'optimizer', 'config', 'vocab', 'iter', 'best_val', 'args', 'rng'}
    if fmt != FORMAT or not keys <= ckpt.keys() or not isinstance(ckpt['args'], dict):
        raise CliError(f'{path} is not an mdlm checkpoint')
    return ckpt

def load_model(out_dir, device='cpu'):
    """The model and tokenizer of <out_dir>/ckpt.pt, and the checkpoint."""
    ckpt = load_checkpoint(os.path.join(out_dir, 'ckpt.pt'))
    try:
        model, tok = MDLM(ModelConfig(**ckpt['config'])), Tokenizer(ckpt['vocab'])
        model.load_state_dict(ckpt['model'])
        assert tok.vocab_size == model.config.vocab_size, 'vocabulary and model disagree'
    except Exception as e:
        raise CliError(f'the checkpoint does not hold a valid mdlm model ({type(e).__name__})')
    print(f'loaded {out_dir}/ckpt.pt: step {ckpt["iter"]}, {model.num_params() / 1e6:.2f}M parameters, {device}',
          file=sys.stderr)
    return model.to(device).eval(), tok, ckpt

def resume_config(ckpt, args):
    """--resume: the saved architecture (another is refused) and the saved training settings not given again."""
    config, changed = ModelConfig(**ckpt['config']), []
    for name in ARCH_FLAGS:
        if name in args.explicit and getattr(args, name) != getattr(config, name):
            raise CliError(f'cannot resume with {name} {getattr(args, name)}: the run has {getattr(config, name)}')
        setattr(args, name, getattr(config, name))    # the run's args, saved with it, say what it is
    for name in TRAIN_FLAGS:
        if name not in ckpt['args']:
            raise CliError(f'the checkpoint predates the setting {name}: train it again')
        if name not in args.explicit:
            setattr(args, name, ckpt['args'][name])
        elif getattr(args, name) != ckpt['args'][name]:
            changed.append(f'{name}: {ckpt["args"][name]} -> {getattr(args, name)}')
    if 'dropout' in args.explicit and args.dropout != config.dropout:
        changed.append(f'dropout: {config.dropout} -> {args.dropout}')
        config.dropout = args.dropout
    if args.data == DEFAULT_DATA and ckpt['args'].get('data'):   # the text it was trained on
        args.data = ckpt['args']['data']
    return config, changed

def restore_state(ckpt, run, args):
    run.model.load_state_dict(ckpt['model'])
    try:
        assert len(ckpt['optimizer']) == len(run.optimizers)
        [opt.load_state_dict(state) for opt, state in zip(run.optimizers, ckpt['optimizer'])]
        run.gen.set_state(ckpt['rng']['gen'])
        torch.set_rng_state(ckpt['rng']['torch'])
        if run.device.startswith('cuda') and ckpt['rng'].get('cuda') is not None:
            torch.cuda.set_rng_state(ckpt['rng']['cuda'])
    except (AssertionError, TypeError, ValueError, KeyError, RuntimeError):
        raise CliError(f'the checkpoint\'s optimizer state does not fit its optimizer, {args.optimizer}, or its '
                       f'random state this device, {run.device}: resume as it was trained')
    if run.world > 1:    # only rank 0's dropout RNG was saved: give the other ranks their own again
        torch.manual_seed(args.seed + run.rank + 1_000_003 * ckpt['iter'])
    run.it, run.best_val = ckpt['iter'], ckpt['best_val']

def ddp_setup(device_arg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: one process per device, nanoGPT style."""
    if int(os.environ.get('WORLD_SIZE', 1)) == 1:
        return 0, 1, pick_device(device_arg)
    rank, world, local = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    device = f'cuda:{local}' if (device_arg or 'cuda').startswith('cuda') and torch.cuda.is_available() else 'cpu'
    if device != 'cpu':
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend='gloo' if device == 'cpu' else 'nccl')
    return rank, world, device

def any_rank(flag, device, world):
    """True on every rank when `flag` is true on any (so all ranks stop at the same step)."""
    if world == 1:
        return bool(flag)
    f = torch.tensor([float(bool(flag))], device=device)
    torch.distributed.all_reduce(f, op=torch.distributed.ReduceOp.MAX)
    return f.item() > 0

# %% Harness: the training run ---------------------------------------------------------------------
# train_step in a loop, with what a long run needs: evals logged to <out-dir>/log.csv, saves, Ctrl-C, --resume.

def start_run(args):
    """Everything a run needs, fresh or resumed from <out-dir>/ckpt.pt: a namespace."""
    rank, world, device = ddp_setup(args.device)
    run = types.SimpleNamespace(rank=rank, world=world, device=device, started=time.time(), it=0,
                                best_val=float('inf'), ckpt_path=os.path.join(args.out_dir, 'ckpt.pt'),
                                best_path=os.path.join(args.out_dir, 'best', 'ckpt.pt'))
    run.log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if rank == 0 else (lambda *a: None)
    resolve(args, device)
    # 1) the shape and the training settings: from the preset, or a resumed run's from its checkpoint
    ckpt = load_checkpoint(run.ckpt_path) if args.resume else None
    if ckpt:
        config, changed = resume_config(ckpt, args)
    elif os.path.exists(run.ckpt_path) and load_checkpoint(run.ckpt_path)['config']['causal'] != args.causal:
        raise CliError(f'{run.ckpt_path} holds a {"diffusion model" if args.causal else "GPT"}, which this '
                       f'run would replace: choose another --out-dir')
    text = load_text(args.data)
    run.tok = Tokenizer(ckpt['vocab'] if ckpt else sorted(set(text)))
    run.config = config if ckpt else ModelConfig(vocab_size=run.tok.vocab_size, dropout=args.dropout,
                                                 **{k: getattr(args, k) for k in ARCH_FLAGS})
    # 2) data: the whole token tensor lives on the device (1.1M chars: a few MB), no loader needed
    run.train_data, run.val_data = splits(text, run.tok, run.config.block_size, args.train_fraction, device)
    # 3) model, optimizers, and one generator for batches and noise: every rank draws the same global
    # batch and noise and keeps its slice, so N ranks see exactly one process's N-times larger batch
    torch.manual_seed(args.seed + rank)      # dropout differs per rank; data and noise do not
    run.model = MDLM(run.config).to(device)  # what gets saved: never the DDP-wrapped one
    run.autocast = autocast_for(device, args.dtype)
    bf16 = run.autocast is not contextlib.nullcontext    # then Muon's Newton-Schulz runs in bf16 too
    run.optimizers = make_optimizers(run.model, args.lr, args.weight_decay, args.optimizer,
                                     torch.bfloat16 if bf16 else torch.float32, fused=device.startswith('cuda'))
    run.gen = torch.Generator(device=device).manual_seed(args.seed)
    if ckpt:
        restore_state(ckpt, run, args)
        run.log(f'resuming from {run.ckpt_path} at step {run.it}' + (f' ({", ".join(changed)})' if changed else ''))
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # on a GPU: fast, ~fp32 matmuls
    run.step_model = run.model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        run.model, device_ids=[device] if device.startswith('cuda') else None)
    run.log(f'device {device}{f" x {world}" if world > 1 else ""} | {"bf16 autocast" if bf16 else "float32"}'
            f' (evals in float32) | preset {"from checkpoint" if ckpt else args.preset} | {len(run.train_data):,} '
            f'training chars | {run.model.num_params() / 1e6:.2f}M parameters | {asdict(run.config)}')
    return run, ckpt

def check_finite(loss, it, ckpt_path):
    """A non-finite loss ends the run before anything is saved: the last good checkpoint stays."""
    if loss is not None and not math.isfinite(loss.item()):
        raise CliError(f'the loss is not finite at step {it}; kept the last good checkpoint {ckpt_path}')

def save_run(run, args, path=None):
    """The whole state at <out-dir>/ckpt.pt, or at `path` (the best checkpoint)."""
    if run.rank == 0:
        path = path or run.ckpt_path
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_checkpoint(path, {
            'format': FORMAT, 'model': run.model.state_dict(), 'config': asdict(run.config), 'vocab': run.tok.itos,
            'optimizer': [opt.state_dict() for opt in run.optimizers], 'iter': run.it, 'best_val': run.best_val,
            'args': {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))},
            'rng': {'gen': run.gen.get_state(), 'torch': torch.get_rng_state(),
                    'cuda': torch.cuda.get_rng_state() if run.device.startswith('cuda') else None}})

def evaluate_and_save(run, args, fresh):
    """Score, log to log.csv, save; a new best val to <out-dir>/best/ too: a run that overfits keeps its best."""
    train_loss, _ = estimate_loss(run.model, run.train_data, args.eval_iters, args.batch_size)
    val_loss, val_se = estimate_loss(run.model, run.val_data, args.eval_iters, args.batch_size)
    improved, run.best_val = val_loss < run.best_val, min(run.best_val, val_loss)
    name, seconds = 'nll' if run.config.causal else 'nelbo', time.time() - run.started
    run.log(f'step {run.it} | train {name} {train_loss:.4f} | val {name} {val_loss:.4f} +- {val_se:.4f} '
            f'nats/char ({val_loss / math.log(2):.4f} bits/char) | {seconds:.0f}s')
    if run.rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        log_path = os.path.join(args.out_dir, 'log.csv')
        fresh = fresh or not os.path.exists(log_path)
        with open(log_path, 'w' if fresh else 'a') as f:
            f.write('step,train_loss,val_loss,val_se,seconds\n' * fresh
                    + f'{run.it},{train_loss:.5f},{val_loss:.5f},{val_se:.5f},{seconds:.1f}\n')
    if improved:     # best first: a crash between the two saves leaves a ckpt.pt that will find it again
        save_run(run, args, run.best_path)
    save_run(run, args)

def train(args):
    run, ckpt = start_run(args)
    stop = []    # Ctrl-C / SIGTERM only raise a flag: the step in flight finishes, then we save and stop
    old_handlers = {s: signal.signal(s, lambda signum, frame: stop.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    B, T, rank, world, causal = args.batch_size, run.config.block_size, run.rank, run.world, run.config.causal
    start_it, loss, log_every = run.it, None, max(1, args.eval_interval // 5)
    tic, tic_it = time.time(), run.it       # step timing restarts after each eval: ms/step is training alone
    try:
        while True:
            # 1) evaluate and checkpoint (not again at the step a resumed run starts from); stop when asked
            if (run.it % args.eval_interval == 0 or run.it == args.max_iters) and not (ckpt and run.it == start_it):
                check_finite(loss, run.it, run.ckpt_path)
                evaluate_and_save(run, args, fresh=not ckpt and run.it == 0)
                tic, tic_it = time.time(), run.it
            if run.it >= args.max_iters:
                break
            if (world == 1 or run.it % 10 == 0) and any_rank(stop, run.device, world):
                check_finite(loss, run.it, run.ckpt_path)
                save_run(run, args)
                run.log(f'stopped at step {run.it}; saved {run.ckpt_path}. Resume with: python mdlm.py --train '
                        f'--resume' + (f' --out-dir {args.out_dir}' if args.out_dir != 'out' else ''))   # --data: kept
                raise SystemExit(130)
            # 2) one step: world * B rows with t stratified over all of them, this rank's B of them
            batch = training_batch(run.train_data, world * B, T, run.tok.mask_id, run.gen, causal, args.t_proposal)
            batch = tuple(a if a is None else a[rank * B:(rank + 1) * B] for a in batch)
            lr = get_lr(run.it, args.lr, args.min_lr, args.warmup_iters, args.max_iters, args.decay_frac)
            loss = train_step(run.step_model, run.optimizers, batch, lr, args.loss, run.autocast)
            run.it += 1
            if run.it % log_every == 0 or run.it == args.max_iters:   # the only host sync in the loop
                check_finite(loss, run.it, run.ckpt_path)
                dt = (time.time() - tic) / (run.it - tic_it)
                run.log(f'step {run.it} | loss {loss.item():.4f} | lr {lr:.1e} | {dt * 1000:.1f}ms | '
                        f'{B * T * world / dt:,.0f} tok/s | eta {dt * (args.max_iters - run.it):.0f}s')
        run.log(f'done: best val {"nll" if causal else "nelbo"} {run.best_val:.4f} nats/char (saved in '
                f'{run.best_path if os.path.exists(run.best_path) else "none"}); latest checkpoint: {run.ckpt_path}')
        return run.best_val
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if world > 1:
            torch.distributed.destroy_process_group()

# %% Harness: generation and evaluation from the command line --------------------------------------

def parse_infill(text, tok):
    """'To [___] or not' -> ids with as many [MASK]s as the blank is wide: the answer lines up under it."""
    parts = re.split(r'(\[_+\])', text)      # text, blank, text, ..., blank, text
    ids = [i for k, part in enumerate(parts) for i in (tok.encode(part) if k % 2 == 0 else [tok.mask_id] * len(part))]
    if tok.mask_id not in ids:
        raise CliError('the text has no blank to fill: mark one with [___], as wide as the characters it holds')
    return ids

@torch.no_grad()
def gpt_generate(model, prefix, length, num_samples, temperature=1.0, top_p=1.0, generator=None):
    """The GPT twin's loop: `length` characters after `prefix` (ids), one pass each, in a sliding window
    of the start token and the last block_size - 1 characters, as in training."""
    T, start, device = model.config.block_size, model.config.vocab_size - 1, next(model.parameters()).device
    out = torch.tensor(prefix, dtype=torch.long, device=device).repeat(num_samples, 1)   # (B, P)
    for _ in range(length):
        x = torch.cat([torch.full((num_samples, 1), start, device=device), out[:, -(T - 1):]], 1)
        tokens, _ = propose(model(x, None)[:, -1], temperature, top_p, generator)   # (B,) the next char
        out = torch.cat([out, tokens[:, None]], 1)
    return out

def sampler_from_args(args, infill=False):
    """SamplerConfig with the flags given; one fill of a blank takes INFILL_TEMPERATURE (the best guess)."""
    chosen = {f.name: getattr(args, f.name) for f in fields(SamplerConfig) if getattr(args, f.name) is not None}
    if infill and args.num_samples == 1:
        chosen.setdefault('temperature', INFILL_TEMPERATURE)
    return SamplerConfig(**chosen)

def run_generation(args):
    model, tok, _ = load_model(args.out_dir, pick_device(args.device))
    T, device = model.config.block_size, next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(args.seed)
    sampler = sampler_from_args(args, infill=args.infill is not None)
    def on_step(x, frame=itertools.count(1)):    # --show: each step's rows on stderr, newlines drawn as arrows
        n = next(frame)
        print('\n'.join(f'step {n:4d} | {tok.decode(row.tolist())}'.replace('\n', '\u21b5') for row in x),
              file=sys.stderr, flush=True)
    if model.config.causal and (args.infill is not None or args.show):
        raise CliError('a GPT writes left to right, one character a pass: it cannot fill blanks or --show steps')
    if args.complete is not None and not args.complete:
        raise CliError('the prompt is empty: give some text to continue, or use --sample')
    ids = parse_infill(args.infill, tok) if args.infill is not None else tok.encode(args.complete or '')
    if args.infill is not None:
        out = infill(model, ids, args.num_samples, sampler, g, on_step if args.show else None)
    elif model.config.causal:          # a GPT slides over any prompt
        out = gpt_generate(model, ids, args.length or T, args.num_samples, sampler.temperature, sampler.top_p, g)
    elif len(ids) >= T:
        raise CliError(f'the prompt is {len(ids)} characters; to leave room in a context of {T}, use at most {T - 1}')
    else:
        out = generate_text(model, ids, args.length or T, args.num_samples, sampler, g, on_step if args.show else None)
    sys.stdout.write(('\n' + '=' * 40 + '\n').join(tok.decode(row.tolist()) for row in out) + '\n')
    return 0

def run_eval(args):
    """The bound (a GPT: its exact NLL) on val and train; --exact: two exact likelihoods beside the bound."""
    model, tok, ckpt = load_model(args.out_dir, pick_device(args.device))
    device, causal = next(model.parameters()).device, model.config.causal
    fraction = ckpt['args']['train_fraction']     # the train figure: the text it trained on
    train_data, val_data = splits(load_text(args.data), tok, model.config.block_size, fraction, device)
    n, B = args.eval_iters or EVAL_BATCHES, args.batch_size or ckpt['args']['batch_size']   # as in training
    for name, data in (('val', val_data), (f'train{f" (its first {fraction:g})" if fraction < 1 else ""}', train_data)):
        mean, se = estimate_loss(model, data, n, B)
        what = ('nll', f'perplexity {math.exp(mean):.3f} (exact: a GPT\'s likelihood)') if causal \
            else ('nelbo', f'perplexity <= {math.exp(mean):.3f} (an upper bound: the NELBO bounds -log p)')
        print(f'{name} {what[0]}: {mean:.4f} nats/char ({mean / math.log(2):.4f} bits/char) +- {se:.4f} (standard '
              f'error, {n} batches of {B} windows of {model.config.block_size}); {what[1]}')
    if args.exact and not causal:    # L passes a window: on the first EXACT_BATCHES batches, the bound beside it
        m = min(n, EXACT_BATCHES)
        print(f'val, the first {m} of those batches ({m * B} windows): the bound and two exact likelihoods')
        for name, per_seq in (('nelbo (bound)', None), ('exact, left to right', exact_nll),
                              ('exact, surest first', lambda model, x0: exact_nll(model, x0, surest))):
            mean, se = estimate_loss(model, val_data, m, B, per_seq=per_seq)
            print(f'  {name:<22} {mean:.4f} +- {se:.4f} nats/char ({mean / math.log(2):.4f} bits/char)')
    return 0

# %% Harness: the command line ---------------------------------------------------------------------

def checked(kind, ok, what):
    """An argparse type: a finite `kind` for which ok(value) holds, else argparse's one-line error."""
    def parse(s):
        v = kind(s)
        if not (math.isfinite(v) and ok(v)):
            raise argparse.ArgumentTypeError(f'must be {what}, got {s}')
        return v
    parse.__name__ = kind.__name__   # argparse names the type in its "invalid int value" message
    return parse

POSITIVE, NONNEG = checked(int, lambda v: v >= 1, 'at least 1'), checked(int, lambda v: v >= 0, 'at least 0')
UNIT = checked(float, lambda v: 0 < v <= 1, 'in (0, 1]')

def build_parser():
    S = SamplerConfig()
    p = argparse.ArgumentParser(description='A masked diffusion language model, in one file.', allow_abbrev=False)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument('--train', action='store_true', help='train (or --resume) a model (--gpt: the GPT twin)')
    mode.add_argument('--sample', action='store_true', help='generate text from pure noise')
    mode.add_argument('--complete', metavar='PROMPT', help='continue a prompt')
    mode.add_argument('--infill', metavar='TEXT', help='fill the blanks [___] of a text, each as wide as its marker')
    mode.add_argument('--eval', action='store_true', help='the NELBO bound (a GPT: its exact NLL) on the val split')
    p.add_argument('--exact', action='store_true', help='with --eval: two exact likelihoods too (slow; fewer windows)')
    p.add_argument('--preset', choices=['auto', *PRESETS], default='auto', help='auto: base on cuda, else tiny')
    for name in ('--n-layer', '--n-head', '--n-embd', '--block-size', '--batch-size', '--eval-interval'):
        p.add_argument(name, type=POSITIVE, help='default: from --preset')
    p.add_argument('--dropout', type=checked(float, lambda v: 0 <= v < 1, 'in [0, 1)'))
    p.add_argument('--no-time', dest='use_time', action='store_false', default=None, help='no adaLN: t is not told')
    p.add_argument('--gpt', dest='causal', action='store_true', default=None, help='--train the GPT twin (out-gpt/)')
    p.add_argument('--max-iters', type=NONNEG, help='0: build, evaluate, save')
    p.add_argument('--eval-iters', type=POSITIVE, help=f'batches per loss estimate (--eval: {EVAL_BATCHES})')
    p.add_argument('--lr', type=checked(float, lambda v: v > 0, 'above 0'))
    p.add_argument('--train-fraction', type=UNIT, metavar='F', help='train on the first F of the training split')
    p.add_argument('--resume', action='store_true', help='continue from <out-dir>/ckpt.pt')
    p.add_argument('--rule', choices=['confidence', 'ancestral', 'random'], help=f'what a step commits ({S.rule})')
    p.add_argument('--steps', type=POSITIVE, help=f'denoising steps per block ({S.steps})')
    p.add_argument('--semi-ar', type=NONNEG, metavar='N', help=f'blocks of N masks, left to right ({S.semi_ar}; 0 off)')
    p.add_argument('--temperature', type=checked(float, lambda v: v >= 0, 'at least 0'), help='0: argmax')
    p.add_argument('--top-p', type=UNIT, help=f'nucleus sampling ({S.top_p:g}: all)')
    p.add_argument('--num-samples', type=POSITIVE, default=1)
    p.add_argument('--length', type=POSITIVE, help='characters to generate (default: block_size)')
    p.add_argument('--show', action='store_true', help='watch the denoising, step by step')
    p.add_argument('--data', default=DEFAULT_DATA, help='UTF-8 text (default: input.txt, Tiny Shakespeare)')
    p.add_argument('--out-dir', help='where the checkpoint lives (default out/; out-gpt/ for --train --gpt)')
    p.add_argument('--device', help='cuda, mps or cpu (default: the best available)')
    p.add_argument('--dtype', choices=['auto', 'float32', 'bfloat16'], default='auto', help='training precision')
    p.add_argument('--seed', type=checked(int, lambda v: 0 <= v < 2 ** 63, 'in [0, 2**63)'), default=SEED)
    return p

def resolve(args, device):
    """Fill the training flags left unset from the preset and RECIPE: one recipe on every machine."""
    args.preset = args.preset if args.preset != 'auto' else ('base' if device.startswith('cuda') else 'tiny')
    values = {**RECIPE, **PRESETS[args.preset], 'train_fraction': 1.0}
    if args.causal:                      # the GPT twin: no time input, its own decay (lab/README.md)
        values['use_time'], values['decay_frac'] = False, GPT_DECAY_FRAC
    for k, v in values.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.n_embd % args.n_head or (args.n_embd // args.n_head) % 2:
        raise CliError(f'--n-embd {args.n_embd} must split into --n-head {args.n_head} heads of even size')

def main(argv=None):
    for stream in (sys.stdout, sys.stderr):   # a terminal that cannot draw the mask glyph gets an escape
        getattr(stream, 'reconfigure', lambda **kw: None)(errors='backslashreplace')
    args = build_parser().parse_args(argv)
    args.explicit = {k for k, v in vars(args).items() if v is not None}
    args.causal = bool(args.causal)
    try:
        if args.causal and not args.train or args.exact and not args.eval:
            raise CliError('--gpt is for --train (other modes read the kind from the checkpoint); --exact for --eval')
        args.out_dir = args.out_dir or ('out-gpt' if args.train and args.causal else 'out')
        if args.train:
            train(args)
            return 0
        return run_eval(args) if args.eval else run_generation(args)
    except CliError as e:
        print(f'error: {e}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return 130

if __name__ == '__main__' and not NOTEBOOK:   # a notebook's kernel has arguments of its own
    sys.exit(main())
